//! Identity and trust (DESIGN §2): the box's private CA, its server
//! certificate, device certificates and the bundle file a device needs, and
//! the rustls configurations of both ends: `ca` (the box's own identity
//! and what it issues), `bundle` (the device's one file and its client
//! configuration), `revoked` (who may not connect although the CA signed
//! them); this file holds the names, limits and errors they share.
//!
//! Layout in the data dir (`tls/`, mode 0700):
//! - `ca.crt`, `ca.key`: the box's CA. Only this CA is trusted by either end.
//! - `server.crt`, `server.key`: the box's QUIC server certificate.
//!
//! Keys are PKCS#8 PEM, mode 0600.
//!
//! ## Where the device id lives
//!
//! A device certificate carries its id twice: as the subject CN (for people
//! and for tools such as `openssl x509 -text`) and as a SAN URI
//! `urn:outpost:device:<id>`. **The SAN URI is authoritative**: the box
//! reads the id only from it, only after the chain has been verified, and
//! refuses a certificate that has none. The CN is never used for
//! authorisation, so a certificate someone else's tooling issued with a
//! misleading CN cannot impersonate a device.
//!
//! ## Server name
//!
//! The server certificate always carries the DNS name [`SERVER_NAME`]
//! (`outpost-box`) besides the `--san` names, the hostname, `localhost`,
//! `127.0.0.1` and `::1`. Devices verify the box against that fixed name: an
//! edge box's address changes (DHCP, NAT, `--server` overrides) while its CA,
//! which is private to the box and signs nothing but this box's server
//! certificate and its devices (client-auth only), does not.

use crate::engine::command::{DeviceId, Millis};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore, SignatureScheme};
use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod bundle;
mod ca;
mod revoked;

pub use bundle::*;
pub use ca::*;
pub use revoked::*;

/// The ALPN protocol id of the device link, version 1 of the framing.
pub const ALPN: &[u8] = b"outpost/1";

/// The DNS name every server certificate carries and devices verify.
pub const SERVER_NAME: &str = "outpost-box";

/// Prefix of the SAN URI that names a device (the authoritative id).
pub const DEVICE_URI_PREFIX: &str = "urn:outpost:device:";

/// First line of a bundle file.
pub const BUNDLE_HEADER: &str = "# outpost bundle v1";

/// Longest device id accepted.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Directory under the data dir holding the box's keys and certificates.
pub const TLS_DIR: &str = "tls";
/// The CA certificate (PEM), in `TLS_DIR`.
pub const CA_CERT: &str = "ca.crt";
/// The CA key (PKCS#8 PEM, mode 0600), in `TLS_DIR`.
pub const CA_KEY: &str = "ca.key";
/// The QUIC stateless-reset key (32 random bytes).
pub const RESET_KEY: &str = "reset.key";
/// The server certificate (PEM), in `TLS_DIR`.
pub const SERVER_CERT: &str = "server.crt";
/// The server key (PKCS#8 PEM, mode 0600), in `TLS_DIR`.
pub const SERVER_KEY: &str = "server.key";

/// How long the CA and server certificates are valid. Long on purpose: an
/// edge box may be offline for years, and an expired CA would lock out every
/// device at once.
const CA_VALIDITY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Default validity of a device certificate.
pub const DEVICE_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Tolerated clock skew between the box and a device at issuance.
const BACKDATE: Duration = Duration::from_secs(3600);

/// What went wrong with certificates, keys or bundles. Each message names
/// the file involved and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file or directory failed.
    #[error("cannot access {path}: {source}; check that it exists and that this user may read and write it")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// `Identity::load` found no CA certificate: `outpost init` (or a first
    /// `serve`) has not run in this data dir.
    #[error("no CA in {dir}: run `outpost init --data-dir {}` first (or start `outpost serve`, which creates one)", .dir.parent().unwrap_or(.dir).display())]
    NotInitialised {
        /// The `tls/` dir that should hold it.
        dir: PathBuf,
    },
    /// Both CA files are gone from a data dir that holds a store: the
    /// store's devices trust only that CA, so none is made (see
    /// `Identity::check_ca_present`).
    #[error("{} is missing ({missing}) but this data dir holds a store ({}) whose devices were enrolled under it; a new CA would lock every one of them out, so none is created. Restore {} from a backup of this box and start again. Only if this box is truly new and holds nothing worth keeping, move {} aside (the next start then creates a new CA, and every device must be enrolled again)", .tls.display(), .db.display(), .tls.display(), .db.display())]
    CaMissing {
        /// The `tls/` dir.
        tls: PathBuf,
        /// The store's dir.
        db: PathBuf,
        /// Which files are missing, as text for the message.
        missing: String,
    },
    /// The CA on disk is not the one the store recorded at its first start
    /// (a `tls/` from another box): its devices would all be refused.
    #[error("{} is not the CA of this box's store (its SHA-256 starts {found}, the store's CA {expected}): the devices enrolled in the store trust only theirs, so this one would lock every one of them out. Restore {} from a backup of this box and start again. Only if the store should start over under this CA, move {} aside (every device must then be enrolled again)", .tls.join(CA_CERT).display(), .tls.display(), .db.display())]
    CaMismatch {
        /// The `tls/` dir.
        tls: PathBuf,
        /// The store's dir.
        db: PathBuf,
        /// The first 8 bytes, in hex, of the SHA-256 the store recorded.
        expected: String,
        /// The same of the CA certificate on disk.
        found: String,
    },
    /// A key, certificate or key file of the box exists but cannot be used
    /// (bad PEM, not outpost's CA, a key without its certificate, …).
    #[error("{path} is unusable: {detail}; restore it from a backup, or move {dir} aside and run `outpost init` again (every device must then be enrolled again)", dir = .path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    Corrupt {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A device id breaks the rules of `validate_device_id`.
    #[error("`{id}` is not a valid device id: {reason}")]
    BadDeviceId {
        /// The id as given.
        id: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A `--san` name for the server certificate is neither a DNS name nor
    /// an IP address.
    #[error(
        "bad subject alternative name `{name}`: {detail}; pass DNS names or IP addresses to --san"
    )]
    BadSan {
        /// The name as given.
        name: String,
        /// Why it cannot go in a certificate.
        detail: String,
    },
    /// A box address is not `host:port` (see `validate_server_addr`).
    #[error("bad server address `{addr}`: expected host:port (for example box.local:7443 or [fd00::1]:7443)")]
    BadServerAddr {
        /// The address as given.
        addr: String,
    },
    /// A bundle cannot be parsed or used (bad header, wrong PEM blocks, an
    /// id that is not its certificate's, a CA or key rustls refuses, bad
    /// trust anchors). A new bundle from `outpost enroll` is the fix.
    #[error("{source_name} is not a usable outpost bundle: {detail}; create a new one with `outpost enroll <device-id> --out FILE` on the box")]
    Bundle {
        /// Where it came from: the file path given to `Bundle::parse`, or
        /// "the bundle of `ID`".
        source_name: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A certificate that verified carries no `urn:outpost:device:` SAN
    /// URI, so it names no device; it was not issued by `outpost enroll`.
    #[error("the certificate carries no outpost device id (no SAN URI {DEVICE_URI_PREFIX}<id>); it was not issued by `outpost enroll`")]
    NoDeviceId,
    /// A device certificate is not X.509 that parses, or names more than
    /// one device.
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    /// A path a secret file (a bundle) is to be written to is refused: a
    /// link, a directory, a fifo or device node, an existing file without
    /// `replace`, or a directory it cannot be created in.
    #[error("{path} {why}")]
    OutPath {
        /// The path as given.
        path: PathBuf,
        /// The rest of the sentence after the path: why, and what to do.
        why: String,
    },
    /// rcgen could not make a key or a certificate.
    #[error("could not create a certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration built from the box's certificates.
    #[error("could not build the TLS configuration: {0}")]
    Tls(String),
}

impl From<rcgen::Error> for IdentityError {
    fn from(e: rcgen::Error) -> Self {
        IdentityError::Generate(e.to_string())
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn tls_err(e: impl fmt::Display) -> IdentityError {
    IdentityError::Tls(e.to_string())
}

/// Check a device id: 1–64 characters of `A–Z a–z 0–9 . _ -`, starting with a
/// letter or digit. `:` and `/` are excluded because targets use them
/// (`tag:…`, `edge-1/dev-7`).
pub fn validate_device_id(id: &str) -> Result<(), IdentityError> {
    let bad = |reason| {
        Err(IdentityError::BadDeviceId {
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("it is empty");
    }
    if id.len() > MAX_DEVICE_ID_LEN {
        return bad("it is longer than 64 characters");
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("it must start with a letter or a digit");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("use only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// SHA-256 of a certificate's DER: how the box names the one certificate
/// that is a device's identity (its pin).
pub fn cert_fingerprint(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Write `data` to `path` atomically (temp file + rename) with `mode`.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".outpost-tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .tempfile_in(dir)
        .map_err(io_err(path))?;
    tmp.write_all(data).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| IdentityError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// Write a file holding a private key: mode 0600, atomically.
pub fn write_secret(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    write_file(path, data, 0o600)
}

/// A secret file reserved before what it will hold exists: an empty temp
/// file (mode 0600) beside `path`, after checking that `path` may be
/// written. Dropped without [`PendingSecret::commit`], it leaves nothing.
///
/// `enroll --out` reserves the bundle's file before enrolling, so a path
/// that cannot be written refuses the enrollment instead of enrolling a
/// device whose key then exists nowhere.
pub struct PendingSecret {
    path: PathBuf,
    dir: PathBuf,
    tmp: tempfile::NamedTempFile,
    replace: bool,
}

/// Why an existing `path` may not be written as a secret file: anything but
/// a regular file is refused (a link is never followed, nor a fifo or a
/// device written into), and a regular file only with `replace`.
fn check_target(path: &Path, replace: bool) -> Result<(), IdentityError> {
    use std::os::unix::fs::FileTypeExt;
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let t = m.file_type();
    let refuse = |why: &str| {
        Err(IdentityError::OutPath {
            path: path.to_path_buf(),
            why: why.to_string(),
        })
    };
    if t.is_symlink() {
        return refuse("is a symbolic link; a bundle is never written through one: name the file itself, or a new file");
    }
    if t.is_dir() {
        return refuse("is a directory; name a file in it, e.g. DIR/DEVICE.bundle");
    }
    if t.is_fifo() {
        return refuse("is a fifo, not a regular file; name a new file");
    }
    if t.is_block_device() || t.is_char_device() {
        return refuse("is a device node, not a regular file; name a new file");
    }
    if t.is_socket() || !t.is_file() {
        return refuse("is not a regular file; name a new file");
    }
    if !replace {
        return refuse("exists; pass --force to replace it, or name a new file");
    }
    Ok(())
}

impl PendingSecret {
    /// Check `path` and create the temp file in its directory. `replace`:
    /// an existing regular file at `path` may be replaced (never anything
    /// else).
    pub fn reserve(path: &Path, replace: bool) -> Result<PendingSecret, IdentityError> {
        check_target(path, replace)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".outpost-tmp")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .tempfile_in(&dir)
            .map_err(|e| IdentityError::OutPath {
                path: path.to_path_buf(),
                why: format!(
                    "cannot be written: cannot create a file in {}: {e}",
                    dir.display()
                ),
            })?;
        Ok(PendingSecret {
            path: path.to_path_buf(),
            dir,
            tmp,
            replace,
        })
    }

    /// The path it will be written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `data`, fsync it, move it into place and fsync the directory.
    /// Without `replace` nothing at `path` is ever replaced (an entry that
    /// appeared since [`PendingSecret::reserve`] included); with it, only a
    /// regular file is, and the move (a rename) never follows a link.
    pub fn commit(mut self, data: &[u8]) -> Result<(), IdentityError> {
        let path = self.path.clone();
        self.tmp.write_all(data).map_err(io_err(&path))?;
        self.tmp.as_file().sync_all().map_err(io_err(&path))?;
        if self.replace {
            check_target(&path, true)?;
            self.tmp
                .persist(&path)
                .map_err(|e| io_err(&path)(e.error))?;
        } else {
            self.tmp.persist_noclobber(&path).map_err(|e| {
                if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                    IdentityError::OutPath {
                        path: path.clone(),
                        why: "appeared meanwhile; pass --force to replace it, or name a new file"
                            .into(),
                    }
                } else {
                    io_err(&path)(e.error)
                }
            })?;
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        Ok(())
    }
}

fn read_text(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

fn first_cert_der(pem: &str, path: &Path) -> Result<CertificateDer<'static>, IdentityError> {
    let mut rd = pem.as_bytes();
    let first = rustls_pemfile::certs(&mut rd).next();
    match first {
        Some(Ok(c)) => Ok(c),
        Some(Err(e)) => Err(IdentityError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("bad PEM: {e}"),
        }),
        None => Err(IdentityError::Corrupt {
            path: path.to_path_buf(),
            detail: "no certificate in it".into(),
        }),
    }
}

fn load_key(path: &Path) -> Result<KeyPair, IdentityError> {
    let pem = read_text(path)?;
    KeyPair::from_pem(&pem).map_err(|e| IdentityError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("not a PKCS#8 private key ({e})"),
    })
}

#[cfg(feature = "box")]
/// Whether the certificate at `path` names every one of `names` (so a new
/// `--san` makes `init` reissue the server certificate; devices verify the
/// fixed [`SERVER_NAME`], so they are unaffected).
fn cert_has_names(path: &Path, names: &[String]) -> Result<bool, IdentityError> {
    let der = first_cert_der(&read_text(path)?, path)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| IdentityError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("not an X.509 certificate ({e})"),
        })?;
    let mut have = HashSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    have.insert(d.to_ascii_lowercase());
                }
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        have.insert(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(names.iter().all(|n| {
        let n = n
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.to_string())
            .unwrap_or_else(|_| n.to_ascii_lowercase());
        have.contains(&n)
    }))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Check that `addr` looks like `host:port` (`[v6]:port` for IPv6).
pub fn validate_server_addr(addr: &str) -> Result<(), IdentityError> {
    split_host_port(addr)
        .map(|_| ())
        .ok_or_else(|| IdentityError::BadServerAddr {
            addr: addr.to_string(),
        })
}

/// Split `host:port`, unbracketing an IPv6 host.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.trim().rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']')?,
        // An unbracketed IPv6 address has more colons; refuse the ambiguity.
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty() && !host.chars().any(char::is_whitespace)).then_some((host, port))
}

/// The device id in a certificate, from its SAN URI (authoritative, see the
/// module docs). Call it only on a certificate whose chain was verified.
pub fn device_id_from_cert(der: &[u8]) -> Result<DeviceId, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?
        .ok_or(IdentityError::NoDeviceId)?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(DEVICE_URI_PREFIX),
        _ => None,
    });
    let id = ids.next().ok_or(IdentityError::NoDeviceId)?;
    if ids.next().is_some() {
        return Err(IdentityError::BadCertificate(
            "the certificate names more than one device".into(),
        ));
    }
    validate_device_id(id)?;
    Ok(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn new_identity() -> (tempfile::TempDir, Identity) {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::init(dir.path(), &["box.example".into(), "10.1.2.3".into()]).unwrap();
        (dir, id)
    }

    /// Runs a TLS handshake in memory; the first error of either side.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(), rustls::Error> {
        let mut c = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from(SERVER_NAME).unwrap(),
        )?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..50 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
                return Ok(());
            }
        }
        panic!("handshake did not finish in 50 rounds");
    }

    #[test]
    fn init_creates_ca_and_server_cert_with_private_keys() {
        let (dir, id) = new_identity();
        let tls = Identity::tls_dir(dir.path());
        assert_eq!(mode(&tls.join(CA_KEY)), 0o600);
        assert_eq!(mode(&tls.join(SERVER_KEY)), 0o600);
        assert_eq!(mode(&tls), 0o700);
        assert!(Identity::exists(dir.path()));
        // A second init keeps the CA (replacing it would orphan every
        // device) and the server certificate while it has the names.
        let again = Identity::init(dir.path(), &["box.example".into()]).unwrap();
        assert_eq!(again.ca_pem(), id.ca_pem());
        assert_eq!(again.server_cert_der, id.server_cert_der);
        // A new --san reissues the server certificate only.
        let more = Identity::init(dir.path(), &["new.example".into()]).unwrap();
        assert_eq!(more.ca_pem(), id.ca_pem());
        assert_ne!(more.server_cert_der, id.server_cert_der);
        let (_, srv) = x509_parser::parse_x509_certificate(&more.server_cert_der).unwrap();
        let san = format!(
            "{:?}",
            srv.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(san.contains("new.example"), "{san}");
        let bundle = id.issue_device("d", "h:1").unwrap();
        handshake(
            bundle.client_config().unwrap(),
            more.server_config(RevokedSet::new()).unwrap(),
        )
        .unwrap();
        let (_, srv) = x509_parser::parse_x509_certificate(&id.server_cert_der).unwrap();
        let san = format!(
            "{:?}",
            srv.subject_alternative_name().unwrap().unwrap().value
        );
        for name in [
            SERVER_NAME,
            "box.example",
            "localhost",
            "[10, 1, 2, 3]",
            "[127, 0, 0, 1]",
        ] {
            assert!(san.contains(name), "{name} missing from {san}");
        }
    }

    #[test]
    fn load_names_the_way_out_when_not_initialised_or_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let e = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("outpost init"), "{e}");
        Identity::init(dir.path(), &[]).unwrap();
        let key = Identity::tls_dir(dir.path()).join(CA_KEY);
        std::fs::write(&key, "garbage").unwrap();
        let e = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ca.key") && e.contains("PKCS#8"), "{e}");
        // The key of another CA does not fit this certificate.
        let other = KeyPair::generate().unwrap();
        std::fs::write(&key, other.serialize_pem()).unwrap();
        let e = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("does not belong"), "{e}");
        std::fs::remove_file(&key).unwrap();
        let e = Identity::init(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("CA key is missing"), "{e}");
    }

    #[test]
    fn a_damaged_ca_or_server_certificate_is_named_at_init_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        Identity::init(dir.path(), &[]).unwrap();
        let tls = Identity::tls_dir(dir.path());
        let srv = tls.join(SERVER_CERT);
        let good = std::fs::read_to_string(&srv).unwrap();
        // (what the file holds, what the error must say)
        let cases = [
            ("not pem at all\n".to_string(), "no certificate in it"),
            (
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_string(),
                "bad PEM",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_string(),
                "not an X.509 certificate",
            ),
        ];
        for (text, words) in cases {
            std::fs::write(&srv, &text).unwrap();
            let e = Identity::init(dir.path(), &[]).unwrap_err().to_string();
            assert!(e.contains(words) && e.contains(SERVER_CERT), "{words}: {e}");
        }
        // A new --san reissues a good certificate; an unchanged one keeps it.
        std::fs::write(&srv, &good).unwrap();
        Identity::init(dir.path(), &[]).unwrap();
        assert_eq!(std::fs::read_to_string(&srv).unwrap(), good);
        Identity::init(dir.path(), &["box.example".into()]).unwrap();
        assert_ne!(
            std::fs::read_to_string(&srv).unwrap(),
            good,
            "reissued for the new name"
        );
        // The CA certificate gone while its key is there: named, not remade.
        std::fs::remove_file(tls.join(CA_CERT)).unwrap();
        let e = Identity::init(dir.path(), &[]).unwrap_err().to_string();
        assert!(
            e.contains("the CA certificate is missing while its key exists"),
            "{e}"
        );
    }

    #[test]
    fn bundle_round_trips_through_text_and_names_the_device() {
        let (dir, id) = new_identity();
        let b = id.issue_device("dev-7", "box.example:7443").unwrap();
        let text = b.to_text();
        assert!(text.starts_with("# outpost bundle v1\n"));
        assert!(
            text.contains("\nid = dev-7\nserver = box.example:7443\n-----BEGIN CERTIFICATE-----")
        );
        let path = dir.path().join("dev-7.bundle");
        b.write(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let back = Bundle::read(&path).unwrap();
        assert_eq!(back.id, "dev-7");
        assert_eq!(back.server, "box.example:7443");
        assert_eq!(back.cert_der, b.cert_der);
        assert_eq!(back.key_der, b.key_der);
        assert_eq!(back.ca_der, *id.ca_der());
        assert_eq!(device_id_from_cert(&back.cert_der).unwrap(), "dev-7");
        // The CN carries the id too, for people; the SAN URI is what counts.
        let (_, c) = x509_parser::parse_x509_certificate(&back.cert_der).unwrap();
        let cn = c
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "dev-7");
        assert!(!format!("{back:?}").contains("PRIVATE"));
    }

    #[test]
    fn bundle_parse_errors_name_the_file_and_the_problem() {
        let (_dir, id) = new_identity();
        let text = id
            .issue_device("dev-1", "127.0.0.1:7443")
            .unwrap()
            .to_text();
        let cases: Vec<(String, &str)> = vec![
            ("hello".into(), "first line must be"),
            (text.replace("v1", "v9"), "upgrade outpost"),
            (text.replace("id = dev-1\n", ""), "no `id"),
            (text.replace("server = 127.0.0.1:7443\n", ""), "no `server"),
            (text.replace("127.0.0.1:7443", "nowhere"), "host:port"),
            (
                text.replace("id = dev-1", "id = dev-2"),
                "certificate is for `dev-1`",
            ),
            (text.replace("id = dev-1", "id dev-1"), "key = value"),
            (
                text.split("-----BEGIN PRIVATE KEY")
                    .next()
                    .unwrap()
                    .to_string(),
                "found 1 certificate(s) and 0",
            ),
        ];
        for (t, want) in cases {
            let e = Bundle::parse(&t, "/etc/dev.bundle")
                .unwrap_err()
                .to_string();
            assert!(e.contains("/etc/dev.bundle"), "{e}");
            assert!(e.contains(want), "wanted `{want}` in: {e}");
        }
        let truncated = &text[..text.len() - 40];
        let e = Bundle::parse(truncated, "x.bundle")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.bundle"), "{e}");
        // Comments and unknown keys are skipped (forward compatible).
        let extra = text.replace("id = dev-1", "# note\nlabel = kiosk\nid = dev-1");
        assert_eq!(Bundle::parse(&extra, "x").unwrap().id, "dev-1");
    }

    #[test]
    fn bundle_carries_trust_anchors_and_old_bundles_still_parse() {
        use crate::engine::trust::{key::OperatorKey, Grant, Role, TrustSet};
        let (_dir, id) = new_identity();
        let old = id.issue_device("dev-7", "box.example:7443").unwrap();
        // A bundle from a box that writes no trust lines: none read.
        assert!(Bundle::parse(&old.to_text(), "x").unwrap().trust.is_none());
        let alice = OperatorKey::generate("alice").unwrap();
        let mut set = TrustSet::default();
        set.add(&alice.public, None, Grant::new(Role::Operator), 5);
        set.remove("alice", 6);
        set.add(&alice.public, Some("ops"), Grant::new(Role::Operator), 7);
        let mut b = old.clone();
        b.set_trust("edge-1", &set, true).unwrap();
        assert!(b.set_trust("edge 1", &set, true).is_err());
        let text = b.to_text();
        // The new lines are `key = value` header lines before the PEM: a v1
        // reader skips keys it does not know, so an older device still reads
        // this bundle (it just verifies nothing).
        let header = text.split("-----BEGIN").next().unwrap();
        let added: Vec<&str> = header
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("id =") && !l.starts_with("server ="))
            .collect();
        assert_eq!(added.len(), 3, "{header}");
        for l in &added {
            let (k, _) = l.split_once(" = ").unwrap();
            assert!(["box", "require-signed", "trust"].contains(&k), "{l}");
        }
        assert!(header
            .contains("\nbox = edge-1\nrequire-signed = true\ntrust = operator * ssh-ed25519 "));
        let back = Bundle::parse(&text, "x").unwrap();
        let t = back.trust.unwrap();
        assert_eq!(t.box_name, "edge-1");
        assert!(t.require_signed);
        assert_eq!(t.set.keys.len(), 1);
        assert_eq!(t.set.keys[0].name, "ops");
        assert_eq!(t.set.keys[0].id, alice.public.id);
        assert_eq!(back.cert_der, b.cert_der);
        // A damaged trust line refuses the bundle (a device must not run
        // unverified what its operator meant to be verified).
        let e = Bundle::parse(
            &text.replace("trust = operator", "trust = boss"),
            "/etc/d.bundle",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/d.bundle") && e.contains("unknown role"),
            "{e}"
        );
        let e = Bundle::parse(&text.replace("box = edge-1\n", ""), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `box = NAME`"), "{e}");
        // The clock floor is the certificate's issue time (less the backdate).
        let floor = b.issued_floor().unwrap();
        let now = crate::now_millis();
        assert!(floor <= now && floor > now - 2 * 3_600_000, "{floor} {now}");
    }

    #[test]
    fn device_ids_are_checked() {
        for ok in ["dev-7", "a", "Sensor_01.east", &"x".repeat(64)] {
            validate_device_id(ok).unwrap();
        }
        for bad in [
            "",
            "-x",
            ".x",
            "tag:a",
            "edge/dev",
            "sp ace",
            "é",
            &"x".repeat(65),
        ] {
            assert!(validate_device_id(bad).is_err(), "{bad:?}");
        }
        let (_d, id) = new_identity();
        assert!(id.issue_device("tag:x", "h:1").is_err());
        assert!(id.issue_device("ok", "no-port").is_err());
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("box:7443"), Some(("box", 7443)));
        assert_eq!(split_host_port("[::1]:7443"), Some(("::1", 7443)));
        assert_eq!(split_host_port("::1:7443"), None);
        assert_eq!(split_host_port("box:0"), None);
        assert_eq!(split_host_port(":7443"), None);
        assert_eq!(split_host_port("box"), None);
    }

    #[test]
    fn mutual_tls_accepts_enrolled_devices_only() {
        let (_d, id) = new_identity();
        let revoked = RevokedSet::new();
        let server = || id.server_config(revoked.clone()).unwrap();
        let good = id.issue_device("dev-1", "127.0.0.1:7443").unwrap();
        handshake(good.client_config().unwrap(), server()).unwrap();

        // A device of another box's CA.
        let (_d2, other) = new_identity();
        let foreign = other.issue_device("dev-1", "127.0.0.1:7443").unwrap();
        let mut mixed = foreign.clone();
        mixed.ca_der = id.ca_der().clone();
        let e = handshake(mixed.client_config().unwrap(), server()).unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{e:?}"
        );
        // And the device refuses a box of another CA.
        let e = handshake(foreign.client_config().unwrap(), server()).unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");

        // Expired.
        let past = SystemTime::now() - Duration::from_secs(10 * 86400);
        let expired = id
            .issue_device_with(
                "dev-old",
                "127.0.0.1:7443",
                Validity {
                    not_before: past - Duration::from_secs(86400),
                    not_after: past,
                },
            )
            .unwrap();
        let e = handshake(expired.client_config().unwrap(), server()).unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. }
                )
            ),
            "{e:?}"
        );

        // Revoked, with the same server config: the set is read live.
        let cfg = server();
        assert!(revoked.insert("dev-1"));
        let e = handshake(good.client_config().unwrap(), cfg).unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            ),
            "{e:?}"
        );
        revoked.remove("dev-1");

        // No client certificate at all.
        let mut roots = RootCertStore::empty();
        roots.add(id.ca_der().clone()).unwrap();
        let mut anon = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        anon.alpn_protocols = vec![ALPN.to_vec()];
        let e = handshake(anon, server()).unwrap_err();
        assert!(matches!(e, rustls::Error::NoCertificatesPresented), "{e:?}");
    }

    #[test]
    fn only_the_certificate_issued_last_is_admitted_live() {
        let (_d, id) = new_identity();
        let gate = RevokedSet::new();
        let cfg = id.server_config(gate.clone()).unwrap();
        let old = id.issue_device("dev-1", "127.0.0.1:7443").unwrap();
        // No pin (a record from before pins): any certificate of the CA.
        handshake(old.client_config().unwrap(), cfg.clone()).unwrap();
        let new = id.issue_device("dev-1", "127.0.0.1:7443").unwrap();
        gate.pin("dev-1", Some(cert_fingerprint(&new.cert_der)));
        let e = handshake(old.client_config().unwrap(), cfg.clone()).unwrap_err();
        assert!(
            matches!(
                &e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))
                    if o.to_string().contains("superseded")
            ),
            "{e:?}"
        );
        handshake(new.client_config().unwrap(), cfg.clone()).unwrap();
        // Revoked, then re-admitted with the new pin: the old one stays out.
        gate.insert("dev-1");
        assert!(handshake(new.client_config().unwrap(), cfg.clone()).is_err());
        gate.remove("dev-1");
        handshake(new.client_config().unwrap(), cfg.clone()).unwrap();
        assert!(handshake(old.client_config().unwrap(), cfg.clone()).is_err());
        // Other ids are not affected by this pin.
        let other = id.issue_device("dev-2", "127.0.0.1:7443").unwrap();
        handshake(other.client_config().unwrap(), cfg).unwrap();
    }

    #[test]
    fn no_new_ca_next_to_a_store_only_in_an_empty_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        Identity::init(dir.path(), &[]).unwrap();
        std::fs::create_dir(dir.path().join(crate::shell::store::DB_DIR)).unwrap();
        let tls = Identity::tls_dir(dir.path());
        std::fs::remove_dir_all(&tls).unwrap();
        let e = Identity::init(dir.path(), &[]).unwrap_err();
        assert!(matches!(e, IdentityError::CaMissing { .. }), "{e:?}");
        let msg = e.to_string();
        for want in ["ca.crt", "ca.key", "backup", "move", "db"] {
            assert!(msg.contains(want), "{want} missing from: {msg}");
        }
        assert!(!tls.exists(), "a refused init leaves nothing behind");
        // An empty tls/ is the same case.
        std::fs::create_dir(&tls).unwrap();
        assert!(matches!(
            Identity::init(dir.path(), &[]),
            Err(IdentityError::CaMissing { .. })
        ));
        std::fs::remove_dir_all(dir.path().join(crate::shell::store::DB_DIR)).unwrap();
        Identity::init(dir.path(), &[]).unwrap();
    }

    #[test]
    fn a_cert_without_a_device_uri_is_refused() {
        let (_d, id) = new_identity();
        // Signed by our CA, CN looks like a device, but no SAN URI.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["dev-1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "dev-1");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &id.ca_issuer, &id.ca_key).unwrap();
        assert!(matches!(
            device_id_from_cert(cert.der()),
            Err(IdentityError::NoDeviceId)
        ));
        let mut b = id.issue_device("dev-1", "h:1").unwrap();
        b.cert_der = cert.der().clone();
        b.key_der = key.serialize_der();
        let e = handshake(
            b.client_config().unwrap(),
            id.server_config(RevokedSet::new()).unwrap(),
        )
        .unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(_)), "{e:?}");
    }

    #[test]
    fn a_pending_secret_never_replaces_what_appears_at_its_path_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.bundle");
        let names = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // A file appears after the reservation: not replaced.
        let p = PendingSecret::reserve(&path, false).unwrap();
        std::fs::write(&path, b"theirs").unwrap();
        let e = p.commit(b"ours").unwrap_err().to_string();
        assert!(
            e.contains("appeared meanwhile") && e.contains("--force"),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
        // With replace, a link that appears is not written through.
        std::fs::remove_file(&path).unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"target").unwrap();
        let p = PendingSecret::reserve(&path, true).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let e = p.commit(b"ours").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"target");
        // Dropped or failed, a reservation leaves no temp file.
        drop(PendingSecret::reserve(&dir.path().join("other"), false).unwrap());
        assert_eq!(names(), vec!["d.bundle", "target"]);
        // Committed: the data, mode 0600.
        std::fs::remove_file(&path).unwrap();
        PendingSecret::reserve(&path, false)
            .unwrap()
            .commit(b"ours")
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"ours");
        assert_eq!(mode(&path), 0o600);
    }
}
