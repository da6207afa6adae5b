//! What each admin request records. Writes and security functions are
//! audited; plain reads (status, show, devices, watch, …) are not: the
//! dashboard polls them, and an entry per poll would wear the flash out
//! while saying nothing about who changed what (IEC 62443 asks for access
//! to security-relevant functions).

use crate::engine::audit::Note;
use crate::shell::admin::{AdminRequest, AdminResponse};

/// Who called and over what, as an entry names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Who, as the entry's `who`: `uid 1000` on the socket (`uid ?` when
    /// the kernel gave no credentials).
    pub who: String,
    /// Over what, as the entry's `from`: `socket`.
    pub from: String,
}

impl Caller {
    /// A caller on the admin socket, by its peer's uid.
    pub fn socket(uid: Option<u32>) -> Caller {
        Caller {
            who: uid.map_or_else(|| "uid ?".into(), |u| format!("uid {u}")),
            from: "socket".into(),
        }
    }
}

/// An entry before its answer is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    /// The request's name in the log: `send`, `revoke`, `rollout pause`, …
    pub what: &'static str,
    /// The target, device, workflow file or artifact it acts on ("" when
    /// none, as for a cancel, which names a command instead).
    pub target: String,
    /// The command, workflow run or rollout id the request names; `None`
    /// when it names none (`note` then takes the one its answer gives).
    pub command: Option<String>,
    /// SHA-256 of what the request carries (a send's payload, a workflow's
    /// text, a rollout's plan, an artifact's manifest); `None` when nothing.
    pub payload_sha256: Option<crate::engine::audit::Hash>,
}

/// The draft of `req`'s entry; `None` for a plain read.
pub fn draft(req: &AdminRequest) -> Option<Draft> {
    use AdminRequest as R;
    let d = |what, target: String, command: Option<String>| Draft {
        what,
        target,
        command,
        payload_sha256: None,
    };
    Some(match req {
        R::Send(s) => Draft {
            payload_sha256: Some(crate::engine::audit::sha256(&s.payload)),
            ..d("send", s.target.clone(), None)
        },
        R::Cancel(id) => d("cancel", String::new(), Some(id.to_string())),
        R::Retry(id) => d("retry", String::new(), Some(id.to_string())),
        R::Enroll { id, .. } => d("enroll", id.clone(), None),
        R::Revoke(id) => d("revoke", id.clone(), None),
        R::Relabel(r) => d("relabel", r.device.clone(), None),
        R::WorkflowRun { file, text, .. } => Draft {
            payload_sha256: Some(crate::engine::audit::sha256(text.as_bytes())),
            ..d("workflow run", file.clone(), None)
        },
        R::WorkflowCancel { id, .. } => d("workflow cancel", String::new(), Some(id.to_string())),
        R::RolloutStart { plan } => Draft {
            payload_sha256: Some(crate::engine::audit::sha256(plan)),
            ..d(
                "rollout start",
                serde_json::from_slice::<crate::engine::rollout::Plan>(plan)
                    .map(|p| p.target.join(","))
                    .unwrap_or_default(),
                None,
            )
        },
        R::RolloutVerb { id, verb } => d(verb.audit_name(), String::new(), Some(id.to_string())),
        R::Audit { .. } => d("audit", String::new(), None),
        R::AuditVerify => d("audit verify", String::new(), None),
        R::Trust(crate::engine::trust::TrustEdit::Add { public, name, .. }) => d(
            "trust add",
            name.clone()
                .unwrap_or_else(|| public.split_whitespace().last().unwrap_or("").to_string()),
            None,
        ),
        R::Trust(crate::engine::trust::TrustEdit::Remove { key }) => {
            d("trust remove", key.clone(), None)
        }
        R::ArtifactCommit { manifest } => Draft {
            payload_sha256: Some(crate::engine::audit::sha256(manifest)),
            ..d(
                "artifact add",
                crate::engine::artifact::Manifest::decode(manifest)
                    .map(|m| m.label())
                    .unwrap_or_default(),
                None,
            )
        },
        R::ArtifactRemove(spec) => d("artifact rm", spec.clone(), None),
        R::Backup => d("backup", String::new(), None),
        _ => return None,
    })
}

impl Draft {
    /// The entry, once `resp` answered the request.
    pub fn note(self, caller: &Caller, resp: &AdminResponse, at: u64) -> Note {
        let command = self.command.or(match resp {
            AdminResponse::Receipt(r) => Some(r.id.to_string()),
            AdminResponse::Workflow(v) => Some(v.id.to_string()),
            AdminResponse::Rollout(v) => Some(v.id.to_string()),
            _ => None,
        });
        let why = match resp {
            AdminResponse::Error { message, .. } => Some(message.clone()),
            _ => None,
        };
        Note {
            at,
            who: caller.who.clone(),
            from: caller.from.clone(),
            what: self.what.into(),
            target: self.target,
            command,
            payload_sha256: self.payload_sha256,
            allowed: why.is_none(),
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_drafted_and_plain_reads_are_not() {
        assert!(draft(&AdminRequest::Status).is_none());
        assert!(draft(&AdminRequest::Devices).is_none());
        let d = draft(&AdminRequest::Revoke("dev-7".into())).unwrap();
        let refused = AdminResponse::Error {
            kind: crate::shell::admin::ErrorKind::NotFound,
            message: "no device".into(),
        };
        let n = d.note(&Caller::socket(Some(1000)), &refused, 5);
        assert_eq!((n.who.as_str(), n.from.as_str()), ("uid 1000", "socket"));
        assert_eq!((n.what.as_str(), n.target.as_str()), ("revoke", "dev-7"));
        assert!(!n.allowed);
        assert_eq!(n.why.as_deref(), Some("no device"));
        assert_eq!(
            AdminRequest::AuditVerify.verb().0,
            crate::engine::trust::Verb::Audit
        );
    }
}
