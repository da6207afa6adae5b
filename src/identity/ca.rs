//! The box's own identity: its private CA, its QUIC server certificate,
//! and the device certificates and bundles it issues.

use super::*;

/// The box's CA and server certificate, loaded from the data dir.
pub struct Identity {
    pub(super) dir: PathBuf,
    pub(super) ca_cert_pem: String,
    pub(super) ca_cert_der: CertificateDer<'static>,
    pub(super) ca_key: KeyPair,
    /// The CA re-signed from its stored parameters and key: rcgen needs a
    /// `Certificate` to sign with, and only its name and key matter.
    pub(super) ca_issuer: rcgen::Certificate,
    pub(super) server_cert_der: CertificateDer<'static>,
    pub(super) server_key_der: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("dir", &self.dir).finish()
    }
}

/// Validity of a certificate to issue.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// The first instant it is valid. Devices' clocks may be behind the
    /// box's: `for_duration` backdates it an hour.
    pub not_before: SystemTime,
    /// The last instant it is valid: past it the box refuses a device
    /// certificate at the handshake ("certificate expired"). Written as at
    /// most 250 years after the Unix epoch.
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `d`.
    pub fn for_duration(d: Duration) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH),
            not_after: now.checked_add(d).unwrap_or(now),
        }
    }
}

impl Default for Validity {
    fn default() -> Self {
        Validity::for_duration(DEVICE_VALIDITY)
    }
}

/// Latest instant we put in a certificate; `time` panics past year 9999 and
/// nothing needs more.
const MAX_SINCE_EPOCH: Duration = Duration::from_secs(250 * 365 * 24 * 3600);

fn set_validity(params: &mut CertificateParams, v: Validity) {
    let since = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .min(MAX_SINCE_EPOCH)
    };
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since(v.not_before);
    params.not_after = epoch + since(v.not_after);
}

fn ca_params(common_name: &str, v: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "outpost");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, v);
    params
}

/// The names the server certificate carries: [`SERVER_NAME`], `extra`, the
/// hostname, `localhost`, `127.0.0.1` and `::1`, without duplicates.
pub fn server_sans(extra: &[String]) -> Vec<String> {
    let mut names = vec![SERVER_NAME.to_string()];
    names.extend(extra.iter().map(|s| s.trim().to_string()));
    if let Some(h) = hostname() {
        names.push(h);
    }
    names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    let mut seen = HashSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.to_ascii_lowercase()));
    names
}

/// This machine's hostname, when a certificate can carry it as a DNS name
/// (ASCII letters, digits, `.` and `-`); `None` for any other name or when
/// `gethostname` fails. The server certificate carries it; its first label
/// is also the default name of the box and of an edge.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most
    // that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim();
    // Only names a certificate can carry as a DNS name; anything else
    // (non-ASCII, spaces) would fail the whole init for no gain.
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    ok.then(|| name.to_string())
}

#[cfg(feature = "box")]
fn to_san(name: &str) -> Result<SanType, IdentityError> {
    let bad = |detail: String| IdentityError::BadSan {
        name: name.to_string(),
        detail,
    };
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*'))
    {
        return Err(bad("not a DNS name or an IP address".into()));
    }
    Ok(SanType::DnsName(
        name.to_string()
            .try_into()
            .map_err(|e: rcgen::Error| bad(e.to_string()))?,
    ))
}

impl Identity {
    /// The directory holding the box's certificates under `data_dir`.
    pub fn tls_dir(data_dir: &Path) -> PathBuf {
        data_dir.join(TLS_DIR)
    }

    /// Whether `data_dir` already holds a CA.
    pub fn exists(data_dir: &Path) -> bool {
        let d = Self::tls_dir(data_dir);
        d.join(CA_CERT).exists() && d.join(CA_KEY).exists()
    }

    #[cfg(feature = "box")]
    /// Refuse a data dir that holds a store but not both CA files: its
    /// devices trust only the CA they were enrolled under, so minting a new
    /// one would lock all of them out while the box looks healthy. Only a
    /// data dir without a store may get a new CA. (`doctor` runs this too.)
    pub fn check_ca_present(data_dir: &Path) -> Result<(), IdentityError> {
        let dir = Self::tls_dir(data_dir);
        let db = data_dir.join(crate::shell::store::DB_DIR);
        let missing: Vec<&str> = [CA_CERT, CA_KEY]
            .into_iter()
            .filter(|f| !dir.join(f).exists())
            .collect();
        // Both missing only: one of the two alone is named by `init` itself.
        if missing.len() == 2 && db.exists() {
            return Err(IdentityError::CaMissing {
                tls: dir,
                db,
                missing: format!("no {CA_CERT} and no {CA_KEY}"),
            });
        }
        Ok(())
    }

    #[cfg(feature = "box")]
    /// Check this CA against the one `data_dir`'s store recorded (`None`:
    /// nothing recorded yet, a store from before boxes kept it).
    pub fn check_store_ca(
        &self,
        data_dir: &Path,
        recorded: Option<[u8; 32]>,
    ) -> Result<(), IdentityError> {
        let ours = cert_fingerprint(&self.ca_cert_der);
        match recorded {
            Some(fp) if fp != ours => {
                let hex = |b: &[u8; 32]| hex::encode(&b[..8]);
                Err(IdentityError::CaMismatch {
                    tls: self.dir.clone(),
                    db: data_dir.join(crate::shell::store::DB_DIR),
                    expected: hex(&fp),
                    found: hex(&ours),
                })
            }
            _ => Ok(()),
        }
    }

    #[cfg(feature = "box")]
    /// Load the identity in `data_dir`, creating what is missing: the CA on
    /// first start (only while the data dir holds no store), and the server certificate (with `sans`, see
    /// [`server_sans`]) whenever it is absent. An existing CA is never
    /// replaced, since that would orphan every enrolled device.
    pub fn init(data_dir: &Path, sans: &[String]) -> Result<Identity, IdentityError> {
        let dir = Self::tls_dir(data_dir);
        // Checked before anything is created, so a refused start leaves the
        // data dir as it found it.
        Self::check_ca_present(data_dir)?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(&dir))?;
        }
        let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
        match (ca_cert.exists(), ca_key.exists()) {
            (true, true) => {}
            (false, false) => {
                let key = KeyPair::generate()?;
                let cn = format!("outpost CA {:08x}", rand::random::<u32>());
                let cert = ca_params(&cn, Validity::for_duration(CA_VALIDITY)).self_signed(&key)?;
                // Key first: a cert without its key is the state we refuse.
                write_secret(&ca_key, key.serialize_pem().as_bytes())?;
                write_file(&ca_cert, cert.pem().as_bytes(), 0o644)?;
                tracing::info!(dir = %dir.display(), "created the box CA");
            }
            (true, false) => {
                return Err(IdentityError::Corrupt {
                    path: ca_key,
                    detail: "the CA key is missing while its certificate exists".into(),
                })
            }
            (false, true) => {
                return Err(IdentityError::Corrupt {
                    path: ca_cert,
                    detail: "the CA certificate is missing while its key exists".into(),
                })
            }
        }
        let (srv_cert, srv_key) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));
        let wanted = server_sans(sans);
        if !srv_cert.exists() || !srv_key.exists() || !cert_has_names(&srv_cert, &wanted)? {
            let (_, ca_key, ca_issuer) = Self::load_ca(&dir)?;
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "outpost");
            dn.push(DnType::CommonName, "outpost box");
            params.distinguished_name = dn;
            params.subject_alt_names =
                wanted.iter().map(|n| to_san(n)).collect::<Result<_, _>>()?;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            set_validity(&mut params, Validity::for_duration(CA_VALIDITY));
            let cert = params.signed_by(&key, &ca_issuer, &ca_key)?;
            write_secret(&srv_key, key.serialize_pem().as_bytes())?;
            write_file(&srv_cert, cert.pem().as_bytes(), 0o644)?;
            tracing::info!(dir = %dir.display(), "created the box server certificate");
        }
        Self::load(data_dir)
    }

    /// Load an existing identity; [`IdentityError::NotInitialised`] if there
    /// is none.
    pub fn load(data_dir: &Path) -> Result<Identity, IdentityError> {
        let dir = Self::tls_dir(data_dir);
        if !dir.join(CA_CERT).exists() {
            return Err(IdentityError::NotInitialised { dir });
        }
        let (ca_cert_pem, ca_key, ca_issuer) = Self::load_ca(&dir)?;
        let ca_cert_der = first_cert_der(&ca_cert_pem, &dir.join(CA_CERT))?;
        let srv_path = dir.join(SERVER_CERT);
        let server_cert_der = first_cert_der(&read_text(&srv_path)?, &srv_path)?;
        let server_key = load_key(&dir.join(SERVER_KEY))?;
        Ok(Identity {
            dir,
            ca_cert_pem,
            ca_cert_der,
            ca_key,
            ca_issuer,
            server_cert_der,
            server_key_der: server_key.serialize_der(),
        })
    }

    fn load_ca(dir: &Path) -> Result<(String, KeyPair, rcgen::Certificate), IdentityError> {
        let cert_path = dir.join(CA_CERT);
        let pem = read_text(&cert_path)?;
        let der = first_cert_der(&pem, &cert_path)?;
        let key = load_key(&dir.join(CA_KEY))?;
        let corrupt = |detail: String| IdentityError::Corrupt {
            path: cert_path.clone(),
            detail,
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| corrupt(format!("not an X.509 certificate ({e})")))?;
        let cn = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .ok_or_else(|| corrupt("the CA certificate has no common name".into()))?
            .to_string();
        let issuer = ca_params(&cn, Validity::for_duration(CA_VALIDITY)).self_signed(&key)?;
        // Certificates we issue name their issuer by these exact bytes and
        // are verified against the stored CA's key; check both match.
        let (_, rebuilt) = x509_parser::parse_x509_certificate(issuer.der())
            .map_err(|e| corrupt(format!("cannot re-read the CA ({e})")))?;
        if rebuilt.subject().as_raw() != parsed.subject().as_raw() {
            return Err(corrupt(
                "the CA certificate was not made by outpost (its subject cannot be reproduced)"
                    .into(),
            ));
        }
        if rebuilt.public_key().raw != parsed.public_key().raw {
            return Err(IdentityError::Corrupt {
                path: dir.join(CA_KEY),
                detail: "this key does not belong to ca.crt".into(),
            });
        }
        Ok((pem, key, issuer))
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_cert_der
    }

    /// The QUIC stateless-reset key, made once and kept: a box restarted
    /// after a crash or a power cut then answers its old connections' next
    /// packet with a reset they accept, so devices reconnect at once instead
    /// of waiting out their idle timeout.
    pub fn reset_key(&self) -> Result<[u8; 32], IdentityError> {
        let path = self.dir().join(RESET_KEY);
        match std::fs::read(&path) {
            Ok(b) => b.as_slice().try_into().map_err(|_| IdentityError::Corrupt {
                path: path.clone(),
                detail: format!(
                    "{} bytes, not 32; delete it (a new one is made at the next start)",
                    b.len()
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                write_secret(&path, &key)?;
                Ok(key)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The directory the certificates live in (`DATA_DIR/tls`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issue a certificate for device `id` and return its bundle, which names
    /// `server` (`host:port`) as the box's address.
    pub fn issue_device(&self, id: &str, server: &str) -> Result<Bundle, IdentityError> {
        self.issue_device_with(id, server, Validity::default())
    }

    /// [`Identity::issue_device`] with an explicit validity (tests issue
    /// expired certificates with it).
    pub fn issue_device_with(
        &self,
        id: &str,
        server: &str,
        validity: Validity,
    ) -> Result<Bundle, IdentityError> {
        validate_device_id(id)?;
        validate_server_addr(server)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "outpost device");
        dn.push(DnType::CommonName, id);
        params.distinguished_name = dn;
        let uri = format!("{DEVICE_URI_PREFIX}{id}");
        params.subject_alt_names = vec![SanType::URI(
            uri.try_into()
                .map_err(|e: rcgen::Error| IdentityError::Generate(e.to_string()))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.ca_issuer, &self.ca_key)?;
        Ok(Bundle {
            id: id.to_string(),
            server: server.to_string(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
            ca_der: self.ca_cert_der.clone(),
            trust: None,
        })
    }

    /// The box's rustls server configuration: TLS 1.3, ALPN [`ALPN`], a
    /// client certificate REQUIRED and verified against our CA, and devices
    /// in `revoked` refused at the handshake.
    pub fn server_config(
        &self,
        revoked: RevokedSet,
    ) -> Result<rustls::ServerConfig, IdentityError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_cert_der.clone()).map_err(tls_err)?;
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(tls_err)?;
        let verifier = Arc::new(DeviceCertVerifier { inner, revoked });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![self.server_cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone())),
            )
            .map_err(tls_err)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        // A resumed TLS session skips the client-certificate verifier, and
        // with it the revocation and expiry checks: every device does a full
        // handshake instead.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(cfg)
    }
}
