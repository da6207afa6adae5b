//! The bundle: the one file a device needs (its certificate and key, the
//! box's CA, where to reach the box), and the rustls client configuration
//! built from it.

use super::*;

/// Everything a device needs: its id, the box's address, its certificate and
/// key, and the CA. Serialised as the bundle text format (DESIGN §2).
#[derive(Clone)]
pub struct Bundle {
    /// The device id (the one in the certificate).
    pub id: DeviceId,
    /// The box's address, `host:port`.
    pub server: String,
    /// The device certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The device's private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The box's CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
    /// Whose signed commands the device runs; `None` in a bundle from a box
    /// that wrote none (the device runs what its box delivers).
    pub trust: Option<crate::engine::trust::DeviceTrust>,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Bundle")
            .field("id", &self.id)
            .field("server", &self.server)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

fn pem_block(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

impl Bundle {
    /// The bundle text: header lines, then the device certificate, its
    /// PKCS#8 key and the CA certificate as PEM.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{BUNDLE_HEADER}\n# Device credentials for outpost. Keep this file secret: it holds a private key.\nid = {}\nserver = {}\n",
            self.id, self.server
        );
        if let Some(t) = &self.trust {
            s.push_str(&t.to_lines());
        }
        s.push_str(&pem_block("CERTIFICATE", &self.cert_der));
        s.push_str(&pem_block("PRIVATE KEY", &self.key_der));
        s.push_str(&pem_block("CERTIFICATE", &self.ca_der));
        s
    }

    /// Give the device its trust anchors: the box's name (the audience it
    /// checks), the operator keys whose signatures count, and whether an
    /// unsigned command is refused. The box's enroll calls this.
    pub fn set_trust(
        &mut self,
        box_name: &str,
        set: &crate::engine::trust::TrustSet,
        require_signed: bool,
    ) -> Result<(), IdentityError> {
        crate::engine::trust::anchors::check_box_name(box_name).map_err(|e| {
            IdentityError::Bundle {
                source_name: format!("the bundle of `{}`", self.id),
                detail: e.to_string(),
            }
        })?;
        self.trust = Some(crate::engine::trust::DeviceTrust {
            box_name: box_name.to_string(),
            require_signed,
            set: crate::engine::trust::TrustSet {
                keys: set.keys.clone(),
                removed: Vec::new(),
            },
        });
        Ok(())
    }

    /// The earliest instant this device's clock can truly show: an hour
    /// before its certificate was issued (the backdating). A clock behind it
    /// is wrong for certain.
    pub fn issued_floor(&self) -> Option<Millis> {
        let (_, c) = x509_parser::parse_x509_certificate(&self.cert_der).ok()?;
        u64::try_from(c.validity().not_before.timestamp())
            .ok()
            .map(|s| s * 1000)
    }

    /// Write the bundle to `path`, mode 0600 (it holds a private key).
    pub fn write(&self, path: &Path) -> Result<(), IdentityError> {
        write_secret(path, self.to_text().as_bytes())
    }

    /// Read and parse the bundle file at `path`.
    pub fn read(path: &Path) -> Result<Bundle, IdentityError> {
        let text = read_text(path)?;
        Bundle::parse(&text, &path.display().to_string())
    }

    /// Parse bundle text; `source_name` (usually the file path) is named in
    /// errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Bundle, IdentityError> {
        let bad = |detail: String| IdentityError::Bundle {
            source_name: source_name.to_string(),
            detail,
        };
        let pem_start = text.find("-----BEGIN").unwrap_or(text.len());
        let (header, pem) = text.split_at(pem_start);
        let mut lines = header.lines().map(str::trim).filter(|l| !l.is_empty());
        match lines.next() {
            Some(l) if l == BUNDLE_HEADER => {}
            Some(l) if l.starts_with("# outpost bundle v") => {
                return Err(bad(format!(
                "it is `{l}`, a format this outpost does not know (it reads v1); upgrade outpost"
            )))
            }
            _ => return Err(bad(format!("the first line must be `{BUNDLE_HEADER}`"))),
        }
        let (mut id, mut server) = (None, None);
        let mut trust = crate::engine::trust::anchors::Reader::default();
        for line in lines {
            if line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad(format!("header line `{line}` is not `key = value`")))?;
            match k.trim() {
                "id" => id = Some(v.trim().to_string()),
                "server" => server = Some(v.trim().to_string()),
                k if trust.take(k, v.trim()).map_err(|e| bad(e.to_string()))? => {}
                // Later v1 writers may add keys; readers skip what they do
                // not know.
                _ => {}
            }
        }
        let id = id.ok_or_else(|| bad("no `id = …` line".into()))?;
        let server = server.ok_or_else(|| bad("no `server = host:port` line".into()))?;
        let trust = trust.finish().map_err(|e| bad(e.to_string()))?;
        validate_server_addr(&server).map_err(|e| bad(e.to_string()))?;
        let mut certs = Vec::new();
        let mut keys = Vec::new();
        let mut rd = pem.as_bytes();
        for item in rustls_pemfile::read_all(&mut rd) {
            match item.map_err(|e| bad(format!("bad PEM: {e}")))? {
                rustls_pemfile::Item::X509Certificate(c) => certs.push(c),
                rustls_pemfile::Item::Pkcs8Key(k) => keys.push(k.secret_pkcs8_der().to_vec()),
                _ => {
                    return Err(bad(
                        "it holds a PEM block other than CERTIFICATE or PRIVATE KEY (PKCS#8)"
                            .into(),
                    ))
                }
            }
        }
        if certs.len() != 2 || keys.len() != 1 {
            return Err(bad(format!(
                "expected the device certificate, its PKCS#8 private key and the CA certificate; found {} certificate(s) and {} PKCS#8 key(s)",
                certs.len(),
                keys.len()
            )));
        }
        let (cert_der, ca_der) = match <[_; 2]>::try_from(certs) {
            Ok([c, ca]) => (c, ca),
            Err(_) => return Err(bad("expected exactly two certificates".into())),
        };
        let cert_id = device_id_from_cert(&cert_der).map_err(|e| bad(e.to_string()))?;
        if cert_id != id {
            return Err(bad(format!(
                "its header says `id = {id}` but its certificate is for `{cert_id}`"
            )));
        }
        Ok(Bundle {
            id,
            server,
            cert_der,
            key_der: keys.pop().unwrap_or_default(),
            ca_der,
            trust,
        })
    }

    /// The device's rustls client configuration: TLS 1.3, ALPN [`ALPN`],
    /// only the bundle's CA trusted, the device certificate presented.
    /// Connect with server name [`SERVER_NAME`].
    pub fn client_config(&self) -> Result<rustls::ClientConfig, IdentityError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .map_err(|e| IdentityError::Bundle {
                source_name: format!("the bundle of `{}`", self.id),
                detail: format!("its CA certificate is unusable ({e})"),
            })?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![self.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .map_err(|e| IdentityError::Bundle {
                source_name: format!("the bundle of `{}`", self.id),
                detail: format!("its key does not fit its certificate ({e})"),
            })?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}
