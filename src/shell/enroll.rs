//! Enrolling a device: what every way of enrolling shares (the admin
//! socket's `Enroll`, and any path that writes the store directly).
//!
//! A device's identity is the certificate issued to it last. Enrolling an
//! id that already exists (enrolled or revoked) is refused unless forced,
//! since it issues a new certificate and every earlier bundle of the id
//! stops working: [`check_existing`]. [`prepare`] checks the names, issues
//! the certificate and builds the record carrying its fingerprint, which the
//! box then admits as the only certificate of the id (`RevokedSet::pin`).

use crate::engine::command::DeviceId;
use crate::engine::journal::DeviceRecord;
use crate::identity::{cert_fingerprint, Bundle, Identity, IdentityError};
use crate::shell::queue::QueueError;

/// What to enroll.
#[derive(Clone, Debug)]
pub struct EnrollRequest {
    /// The device's id: its certificate's common name, and what commands
    /// address it by.
    pub id: DeviceId,
    /// Tags for `tag:NAME` targets and ACL patterns, each checked as a
    /// name; `gateway` adds the reserved `GATEWAY_TAG` after the check.
    pub tags: Vec<String>,
    /// Capabilities the device declares, for `cap:NAME` targets.
    pub caps: Vec<String>,
    /// A box below this one (an edge), not a device.
    pub gateway: bool,
    /// Enroll an id that exists: a new bundle, the old one locked out.
    pub force: bool,
}

/// A certificate issued and the record to store for it.
#[derive(Debug)]
pub struct Enrolled {
    /// What the device is handed: its key and certificate, the CA, the
    /// server to dial and, when the box has any, its trust anchors.
    pub bundle: Bundle,
    /// Carries the certificate's fingerprint in `cert`.
    pub record: DeviceRecord,
}

/// Why an enrollment did not happen.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The certificate could not be issued (a bad id or server address), or
    /// the trust anchors not written into the bundle.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A tag or capability is not a valid name; the message says which and
    /// why.
    #[error("{0}")]
    BadName(String),
    /// The queue did not store the record: an existing id without `force`,
    /// or the store failed or is shutting down.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

pub use crate::engine::queue::core::check_existing;

/// Check the names, issue the device's certificate (its bundle names
/// `server`) and build its record. Nothing is stored: the caller stores the
/// record (refusing an existing id with [`check_existing`] in the same step
/// as the write) and only then hands out the bundle.
pub fn prepare(
    identity: &Identity,
    server: &str,
    req: &EnrollRequest,
) -> Result<Enrolled, EnrollError> {
    let mut tags = req.tags.clone();
    let names = tags
        .iter()
        .map(|t| (t, "tag"))
        .chain(req.caps.iter().map(|c| (c, "capability")));
    for (n, what) in names {
        crate::engine::route::check_name(n, what)
            .map_err(|e| EnrollError::BadName(e.to_string()))?;
    }
    // Checked names first: the reserved tag is the box's own.
    if req.gateway {
        tags.push(crate::engine::route::GATEWAY_TAG.into());
    }
    let bundle = identity.issue_device(&req.id, server)?;
    let record = DeviceRecord {
        tags,
        caps: req.caps.clone(),
        enrolled_at: crate::now_millis(),
        cert: Some(cert_fingerprint(&bundle.cert_der)),
        ..DeviceRecord::new(req.id.clone())
    };
    Ok(Enrolled { bundle, record })
}

/// Enroll a device: [`prepare`] it, then make its record durable through
/// the queue, which refuses an existing id without `force` in the same
/// round as the write (so two enrollments of one id cannot both pass). The
/// one way to enroll, for the running box (the admin socket) and for
/// `outpost enroll` on the data dir of a stopped box alike, so both write
/// the same record, and the same outbox entry for a hub.
pub async fn enroll(
    queue: &crate::shell::queue::QueueHandle,
    identity: &Identity,
    server: &str,
    req: &EnrollRequest,
) -> Result<Enrolled, EnrollError> {
    let mut e = prepare(identity, server, req)?;
    // The box's trust anchors go into the bundle, so the device checks
    // signatures itself; a box with none trusted and none required gives
    // the device nothing to check (as before).
    let gate = queue.gate();
    let set = gate.set();
    if !set.keys.is_empty() || gate.requires_signatures() {
        e.bundle
            .set_trust(gate.name(), &set, gate.requires_signatures())?;
    }
    queue.enroll_new(e.record.clone(), req.force).await?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_id_needs_force_and_each_enrollment_pins_a_new_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::init(dir.path(), &[]).unwrap();
        let req = EnrollRequest {
            id: "dev-1".into(),
            tags: vec!["t".into()],
            caps: vec![],
            gateway: false,
            force: false,
        };
        let a = prepare(&identity, "h:1", &req).unwrap();
        let b = prepare(&identity, "h:1", &req).unwrap();
        assert_eq!(a.record.cert, Some(cert_fingerprint(&a.bundle.cert_der)));
        assert_ne!(a.record.cert, b.record.cert);
        check_existing("dev-1", None, false).unwrap();
        let e = check_existing("dev-1", Some(&a.record), false).unwrap_err();
        assert!(e.is_refusal());
        let msg = e.to_string();
        assert!(msg.contains("`dev-1`") && msg.contains("--force"), "{msg}");
        let revoked = DeviceRecord {
            revoked: true,
            ..a.record.clone()
        };
        let msg = check_existing("dev-1", Some(&revoked), false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("revoked") && msg.contains("--force"), "{msg}");
        check_existing("dev-1", Some(&revoked), true).unwrap();
        let bad = EnrollRequest {
            tags: vec!["a b".into()],
            ..req
        };
        assert!(matches!(
            prepare(&identity, "h:1", &bad),
            Err(EnrollError::BadName(_))
        ));
    }
}
