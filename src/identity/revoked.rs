//! Who may not connect although the box's CA signed them: revoked ids and
//! superseded certificates, refused at the TLS handshake by the box's
//! client-certificate verifier and at once on live connections.

use super::*;

/// Why the box refuses a device's certificate although its CA signed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `outpost revoke`.
    Revoked,
    /// The device was enrolled again since this certificate was issued: only
    /// the certificate issued last is its identity.
    Superseded,
}

/// Who may not connect, shared between the TLS verifier (refuses at the
/// handshake) and the device link (closes live connections): the revoked
/// ids, and per device the fingerprint of the one certificate that is its
/// identity (the one issued last), so every earlier one is refused.
/// Cheap to clone; all clones share one state, so a revocation or a new
/// enrollment applies to the very next handshake.
#[derive(Clone, Default)]
pub struct RevokedSet(Arc<RwLock<Gate>>);

#[derive(Default)]
struct Gate {
    revoked: HashSet<DeviceId>,
    /// One entry per enrolled device with a known certificate: bounded by
    /// the enrollments, like `revoked`.
    pins: std::collections::HashMap<DeviceId, [u8; 32]>,
    refusals: Option<Arc<crate::refusal::Refusals>>,
}

impl RevokedSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding `ids` (the shell loads revoked devices from the store).
    pub fn from_ids(ids: impl IntoIterator<Item = DeviceId>) -> Self {
        let set = Self::new();
        for id in ids {
            set.insert(&id);
        }
        set
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Gate> {
        // A poisoned lock only means a panic elsewhere mid-insert of a
        // String; the sets themselves are still consistent.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Gate> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Add `id`; true if it was not revoked before.
    pub fn insert(&self, id: &str) -> bool {
        self.write().revoked.insert(id.to_string())
    }

    /// Re-admit `id` (after it is enrolled again).
    pub fn remove(&self, id: &str) -> bool {
        self.write().revoked.remove(id)
    }

    /// Whether `id` is revoked.
    pub fn contains(&self, id: &str) -> bool {
        self.read().revoked.contains(id)
    }

    /// Admit only the certificate with fingerprint `fp` for `id` from now on
    /// (`None`: any certificate of the CA, for a record from before pins).
    pub fn pin(&self, id: &str, fp: Option<[u8; 32]>) {
        let mut g = self.write();
        match fp {
            Some(fp) => g.pins.insert(id.to_string(), fp),
            None => g.pins.remove(id),
        };
    }

    /// Whether the certificate with fingerprint `fp` may speak for `id`.
    pub fn check(&self, id: &str, fp: &[u8; 32]) -> Result<(), Refusal> {
        let g = self.read();
        if g.revoked.contains(id) {
            return Err(Refusal::Revoked);
        }
        match g.pins.get(id) {
            Some(pin) if pin != fp => Err(Refusal::Superseded),
            _ => Ok(()),
        }
    }

    /// Where refusals at the handshake are counted and logged (the device
    /// link sets it; without one they are logged each).
    pub fn set_refusal_log(&self, log: Arc<crate::refusal::Refusals>) {
        self.write().refusals = Some(log);
    }

    pub(crate) fn refusal_log(&self) -> Option<Arc<crate::refusal::Refusals>> {
        self.read().refusals.clone()
    }

    /// How many ids are revoked.
    pub fn len(&self) -> usize {
        self.read().revoked.len()
    }

    /// Whether no id is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for RevokedSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.read();
        write!(
            f,
            "RevokedSet({} ids, {} pins)",
            g.revoked.len(),
            g.pins.len()
        )
    }
}

/// The verifier's refusal of a superseded certificate, as the device reads
/// it in the close reason (TLS alert 46, `certificate_unknown`).
#[derive(Debug)]
struct SupersededCert(DeviceId);

impl fmt::Display for SupersededCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this certificate of `{}` was superseded: the device was enrolled again and only its newest bundle is admitted",
            self.0
        )
    }
}

impl std::error::Error for SupersededCert {}

/// Client-certificate verifier of the box: webpki over our CA (chain,
/// validity, client-auth usage), then the device id must be present and not
/// revoked.
#[derive(Debug)]
pub(super) struct DeviceCertVerifier {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) revoked: RevokedSet,
}

impl ClientCertVerifier for DeviceCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = device_id_from_cert(end_entity).map_err(|e| {
            let what = "a certificate without a device id";
            let first = self
                .revoked
                .refusal_log()
                .is_none_or(|log| log.refused(None, None, what));
            if first {
                tracing::warn!(error = %e, "refused {what} (repeats are summed up once a minute)");
            }
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        })?;
        let refusal = match self.revoked.check(&id, &cert_fingerprint(end_entity)) {
            Ok(()) => return Ok(verified),
            Err(r) => r,
        };
        let what = match refusal {
            Refusal::Revoked => "revoked device",
            Refusal::Superseded => "superseded certificate of device",
        };
        // The remote address is not known here; the link logs the failed
        // handshake per address too (`device::serve_connection`).
        match self.revoked.refusal_log() {
            Some(log) => {
                if log.refused(None, Some(&id), what) {
                    tracing::info!(device = %id, "refused a {what} at the handshake (repeats are summed up once a minute)");
                }
            }
            None => tracing::info!(device = %id, "refused a {what} at the handshake"),
        }
        Err(rustls::Error::InvalidCertificate(match refusal {
            Refusal::Revoked => rustls::CertificateError::Revoked,
            Refusal::Superseded => {
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(SupersededCert(id))))
            }
        }))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
