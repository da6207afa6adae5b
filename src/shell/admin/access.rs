//! Who calls on the admin socket and what they may do. The caller is known
//! by its uid (SO_PEERCRED, so the kernel vouches for it, not the client);
//! the config's `[[access]]` tables map uids to a [`Grant`]. uid 0 and the
//! uid the box runs as are always admin: both can read the store directly,
//! so a lesser role for them would only look like a limit (an entry for
//! root is refused; one for the box's user, which only the running box
//! knows, changes nothing). Everyone else unmapped is refused (default
//! deny).
//!
//! Every request is classed here, in one exhaustive match
//! ([`AdminRequest::verb`]), so a new request cannot be added without
//! saying what it needs.

use super::{AdminContext, AdminRequest, AdminResponse, ErrorKind};
use crate::engine::trust::{Denied, Grant, Pattern, Role, Verb};
use serde::Deserialize;
use std::collections::HashMap;

/// One `[[access]]` table of the config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccessEntry {
    /// The caller's uid; give this or `user`, not both.
    pub uid: Option<u32>,
    /// A login name, resolved to its uid when the config is read.
    pub user: Option<String>,
    /// `viewer`, `operator` or `admin` (any case).
    pub role: String,
    /// Targets an operator may act on (empty: every target).
    #[serde(default)]
    pub targets: Vec<String>,
}

/// Why the `[[access]]` tables are unusable; `n` counts from 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    /// The entry gives both `uid` and `user`.
    #[error("[[access]] #{n}: give uid = N or user = \"NAME\", not both")]
    Both {
        /// The entry's place among the tables, from 1.
        n: usize,
    },
    /// The entry gives neither `uid` nor `user`.
    #[error("[[access]] #{n}: name the caller with uid = N or user = \"NAME\"")]
    Neither {
        /// The entry's place among the tables, from 1.
        n: usize,
    },
    /// The password database has no such login.
    #[error(
        "[[access]] #{n}: no user `{user}` on this machine; create it, or write its uid instead"
    )]
    NoUser {
        /// The entry's place among the tables, from 1.
        n: usize,
        /// The login name it gives.
        user: String,
    },
    /// Looking the login up failed (`getpwnam_r`'s error).
    #[error("[[access]] #{n}: cannot look up user `{user}`: {why}")]
    Lookup {
        /// The entry's place among the tables, from 1.
        n: usize,
        /// The login name it gives.
        user: String,
        /// The OS error's text.
        why: String,
    },
    /// An unknown role or a bad target pattern (`grant_of`'s error).
    #[error("[[access]] #{n}: {why}")]
    Value {
        /// The entry's place among the tables, from 1.
        n: usize,
        /// What is wrong with the value.
        why: String,
    },
    /// Two entries map the same uid (by uid or through a user name).
    #[error("[[access]] #{n}: uid {uid} is mapped already by #{first}; one uid, one role")]
    Twice {
        /// The later entry's place, from 1.
        n: usize,
        /// The uid both map.
        uid: u32,
        /// The earlier entry's place, from 1.
        first: usize,
    },
    /// The entry maps uid 0, which is always admin.
    #[error("[[access]] #{n}: uid 0 is root and always admin (it can read the store itself); remove this entry")]
    Root {
        /// The entry's place among the tables, from 1.
        n: usize,
    },
}

/// A role and its target patterns as the config writes them (shared by
/// `[[access]]` and `[[http_tokens]]`).
pub fn grant_of(role: &str, targets: &[String]) -> Result<Grant, String> {
    let role: Role = role.parse()?;
    let targets = targets
        .iter()
        .map(|t| Pattern::new(t))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Grant { role, targets })
}

/// The socket's uid → grant table, resolved from the config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    map: HashMap<u32, Grant>,
}

impl Access {
    /// Check and resolve the tables (user names through `getpwnam_r`).
    pub fn resolve(entries: &[AccessEntry]) -> Result<Access, AccessError> {
        Self::resolve_with(entries, uid_of)
    }

    fn resolve_with(
        entries: &[AccessEntry],
        lookup: impl Fn(&str) -> std::io::Result<Option<u32>>,
    ) -> Result<Access, AccessError> {
        let mut map = HashMap::new();
        let mut first = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            let n = i + 1;
            let uid = match (e.uid, &e.user) {
                (Some(_), Some(_)) => return Err(AccessError::Both { n }),
                (None, None) => return Err(AccessError::Neither { n }),
                (Some(u), None) => u,
                (None, Some(user)) => match lookup(user) {
                    Ok(Some(u)) => u,
                    Ok(None) => {
                        return Err(AccessError::NoUser {
                            n,
                            user: user.clone(),
                        })
                    }
                    Err(e) => {
                        return Err(AccessError::Lookup {
                            n,
                            user: user.clone(),
                            why: e.to_string(),
                        })
                    }
                },
            };
            if uid == 0 {
                return Err(AccessError::Root { n });
            }
            let grant =
                grant_of(&e.role, &e.targets).map_err(|why| AccessError::Value { n, why })?;
            if let Some(&f) = first.get(&uid) {
                return Err(AccessError::Twice { n, uid, first: f });
            }
            first.insert(uid, n);
            map.insert(uid, grant);
        }
        Ok(Access { map })
    }

    /// The grant of a caller with `uid`, or why it has none.
    pub fn grant(&self, uid: u32) -> Result<Grant, Denied> {
        self.grant_with(uid, box_uid())
    }

    fn grant_with(&self, uid: u32, own: u32) -> Result<Grant, Denied> {
        if uid == 0 || uid == own {
            return Ok(Grant::new(Role::Admin));
        }
        self.map
            .get(&uid)
            .cloned()
            .ok_or(Denied::Unmapped { who: who(uid) })
    }
}

/// How a socket caller is named in refusals.
pub fn who(uid: u32) -> String {
    format!("uid {uid}")
}

fn box_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// The uid of login `name`; `None` when there is no such user.
fn uid_of(name: &str) -> std::io::Result<Option<u32>> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::other("a user name cannot hold a NUL byte"))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: passwd is plain data; getpwnam_r writes into `pwd` and
        // `buf` (of the length given) only, and `out` points at `pwd` or
        // is null when it returns.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            )
        };
        match rc {
            0 => return Ok((!out.is_null()).then_some(pwd.pw_uid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            libc::ENOENT | libc::ESRCH => return Ok(None),
            e => return Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

/// The caller of one socket connection: its name in refusals and its
/// grant, or why it has none.
pub(super) struct Caller {
    who: String,
    grant: Result<Grant, Denied>,
}

impl Caller {
    /// The peer of `stream`, looked up in `access`.
    pub(super) fn of(stream: &tokio::net::UnixStream, access: &Access) -> Caller {
        match stream.peer_cred() {
            Ok(c) => Caller {
                who: who(c.uid()),
                grant: access.grant(c.uid()),
            },
            // Without credentials nobody can say who this is: deny.
            Err(e) => Caller {
                who: format!("a caller without credentials ({e})"),
                grant: Err(Denied::Unmapped {
                    who: "a caller without credentials".into(),
                }),
            },
        }
    }
}

impl AdminRequest {
    /// What this request does, and the target it names when the request
    /// itself carries one. Cancel, retry and the workflow verbs act on a
    /// target the box looks up (see [`authorize`]).
    pub fn verb(&self) -> (Verb, Option<&str>) {
        use AdminRequest as R;
        match self {
            R::Send(s) => (Verb::Send, Some(&s.target)),
            R::WorkflowRun { .. } | R::RolloutStart { .. } => (Verb::Send, None),
            // Pausing or resuming a rollout changes what is sent, as a
            // cancel does.
            R::Cancel(_) | R::WorkflowCancel { .. } | R::RolloutVerb { .. } => (Verb::Cancel, None),
            R::Retry(_) => (Verb::Retry, None),
            R::Wait { .. }
            | R::Show(_)
            | R::List { .. }
            | R::Status
            | R::Devices
            | R::DeviceStats
            | R::Watch { .. }
            | R::WorkflowShow(_)
            | R::WorkflowList
            | R::RolloutShow(_)
            | R::RolloutList
            // Read: `send --sign` asks it for the box's name.
            | R::TrustList
            | R::ArtifactList
            | R::ArtifactShow(_) => (Verb::Read, None),
            // Adding a file is part of sending it; removing one is too.
            R::ArtifactLacks { .. }
            | R::ArtifactChunk { .. }
            | R::ArtifactCommit { .. }
            | R::ArtifactRemove(_) => (Verb::Send, None),
            R::Trust(_) => (Verb::Trust, None),
            R::Audit { .. } | R::AuditVerify => (Verb::Audit, None),
            R::Enroll { .. } => (Verb::Enroll, None),
            // It holds the CA key: whoever has it can mint devices.
            R::Backup => (Verb::Config, None),
            R::Revoke(_) => (Verb::Revoke, None),
            R::Relabel(_) => (Verb::Tag, None),
        }
    }
}

fn refused(d: Denied) -> AdminResponse {
    AdminResponse::Error {
        kind: ErrorKind::Refused,
        message: d.to_string(),
    }
}

/// Whether `caller` may make `req`; the refusal is the answer to send.
pub(super) async fn authorize(
    ctx: &AdminContext,
    caller: &Caller,
    req: &AdminRequest,
) -> Result<(), AdminResponse> {
    let grant = caller.grant.as_ref().map_err(|d| refused(d.clone()))?;
    let (verb, target) = req.verb();
    let who = caller.who.as_str();
    grant.check(who, verb, target).map_err(refused)?;
    // Only a bounded grant needs the targets the box must look up.
    if grant.role == Role::Admin || grant.targets.is_empty() || target.is_some() {
        return Ok(());
    }
    for t in looked_up_targets(ctx, req).await? {
        grant.check(who, verb, Some(&t)).map_err(refused)?;
    }
    Ok(())
}

/// The targets a cancel, retry or workflow request acts on. An unknown id
/// answers as the request itself would (not found).
async fn looked_up_targets(
    ctx: &AdminContext,
    req: &AdminRequest,
) -> Result<Vec<String>, AdminResponse> {
    match req {
        AdminRequest::Cancel(id) | AdminRequest::Retry(id) => match ctx.queue.show(*id).await {
            Ok(v) => Ok(vec![v.target]),
            Err(e) => Err(super::error_of(&e)),
        },
        AdminRequest::WorkflowRun {
            file,
            text,
            payloads,
        } => {
            let packed = crate::engine::workflow::Packed {
                file: file.clone(),
                text: text.clone(),
                payloads: payloads.clone(),
            };
            // A workflow that does not parse is refused by the run itself,
            // with its error; here it has no targets yet.
            Ok(packed
                .unpack()
                .map(|w| w.steps.into_iter().map(|s| s.target).collect())
                .unwrap_or_default())
        }
        AdminRequest::WorkflowCancel { id, .. } => {
            let run = match &ctx.workflows {
                Some(w) => w.show(*id).await,
                None => None,
            };
            Ok(run
                .map(|r| r.steps.into_iter().map(|s| s.target).collect())
                .unwrap_or_default())
        }
        AdminRequest::RolloutStart { plan } => {
            // A plan that does not decode is refused by the start itself.
            Ok(serde_json::from_slice::<crate::engine::rollout::Plan>(plan)
                .map(|p| p.target)
                .unwrap_or_default())
        }
        AdminRequest::RolloutVerb { id, .. } => {
            let r = match &ctx.rollouts {
                Some(r) => r.show(*id).await,
                None => None,
            };
            Ok(r.map(|r| r.target).unwrap_or_default())
        }
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shell::queue::SendRequest;

    fn entry(uid: Option<u32>, user: Option<&str>, role: &str, targets: &[&str]) -> AccessEntry {
        AccessEntry {
            uid,
            user: user.map(str::to_string),
            role: role.into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn lookup(name: &str) -> std::io::Result<Option<u32>> {
        Ok((name == "tech").then_some(1005))
    }

    #[test]
    fn every_request_maps_to_its_verb() {
        use AdminRequest as R;
        let id = crate::CommandId::new(1, 2);
        let send = R::Send(SendRequest {
            target: "tag:line-3".into(),
            payload: vec![],
            opts: Default::default(),
            origin: "cli".into(),
            signature: None,
        });
        assert_eq!(send.verb(), (Verb::Send, Some("tag:line-3")));
        let cases = [
            (
                R::WorkflowRun {
                    file: "f".into(),
                    text: String::new(),
                    payloads: vec![],
                },
                Verb::Send,
            ),
            (R::Cancel(id), Verb::Cancel),
            (
                R::WorkflowCancel {
                    id,
                    compensate: false,
                },
                Verb::Cancel,
            ),
            (R::Retry(id), Verb::Retry),
            (R::Wait { id, timeout_ms: 1 }, Verb::Read),
            (R::Show(id), Verb::Read),
            (R::List { device: "d".into() }, Verb::Read),
            (R::Status, Verb::Read),
            (R::Devices, Verb::Read),
            (R::DeviceStats, Verb::Read),
            (R::Watch { device: None }, Verb::Read),
            (R::WorkflowShow(id), Verb::Read),
            (R::WorkflowList, Verb::Read),
            (R::RolloutStart { plan: vec![] }, Verb::Send),
            (R::RolloutShow(id), Verb::Read),
            (R::RolloutList, Verb::Read),
            (
                R::RolloutVerb {
                    id,
                    verb: crate::shell::rollout::Verb::Pause,
                },
                Verb::Cancel,
            ),
            (
                R::Enroll {
                    id: "d".into(),
                    tags: vec![],
                    caps: vec![],
                    gateway: false,
                    force: false,
                },
                Verb::Enroll,
            ),
            (R::Revoke("d".into()), Verb::Revoke),
            (R::Relabel(Default::default()), Verb::Tag),
        ];
        for (req, verb) in cases {
            assert_eq!(req.verb(), (verb, None), "{req:?}");
        }
    }

    #[test]
    fn root_and_the_box_user_are_admin_and_the_unmapped_are_denied() {
        let a = Access::resolve_with(
            &[
                entry(Some(1001), None, "viewer", &[]),
                entry(None, Some("tech"), "operator", &["tag:line-3"]),
                // The box's own uid stays admin whatever an entry says.
                entry(Some(999), None, "viewer", &[]),
            ],
            lookup,
        )
        .unwrap();
        assert_eq!(a.grant_with(0, 999).unwrap().role, Role::Admin);
        assert_eq!(a.grant_with(999, 999).unwrap().role, Role::Admin);
        assert_eq!(a.grant_with(1001, 999).unwrap().role, Role::Viewer);
        let op = a.grant_with(1005, 999).unwrap();
        assert_eq!(op.role, Role::Operator);
        assert!(op.check("uid 1005", Verb::Send, Some("tag:line-3")).is_ok());
        let e = a.grant_with(1002, 999).unwrap_err();
        assert_eq!(
            e,
            Denied::Unmapped {
                who: "uid 1002".into()
            }
        );
        assert!(e.to_string().contains("default deny"), "{e}");
    }

    #[test]
    fn bad_tables_name_the_entry_and_the_fix() {
        let r = |es: &[AccessEntry]| Access::resolve_with(es, lookup).unwrap_err();
        assert_eq!(
            r(&[entry(Some(1), Some("tech"), "viewer", &[])]),
            AccessError::Both { n: 1 }
        );
        assert_eq!(
            r(&[entry(None, None, "viewer", &[])]),
            AccessError::Neither { n: 1 }
        );
        assert!(matches!(
            r(&[entry(None, Some("nobody-here"), "viewer", &[])]),
            AccessError::NoUser { n: 1, .. }
        ));
        let e = r(&[entry(Some(5), None, "boss", &[])]).to_string();
        assert!(e.contains("#1") && e.contains("unknown role `boss`"), "{e}");
        let e = r(&[entry(Some(5), None, "operator", &[""])]).to_string();
        assert!(e.contains("empty target pattern"), "{e}");
        assert_eq!(
            r(&[
                entry(Some(5), None, "viewer", &[]),
                entry(None, Some("tech"), "viewer", &[]),
                entry(Some(5), None, "admin", &[]),
            ]),
            AccessError::Twice {
                n: 3,
                uid: 5,
                first: 1
            }
        );
        assert_eq!(
            r(&[entry(Some(0), None, "viewer", &[])]),
            AccessError::Root { n: 1 }
        );
    }

    #[test]
    fn user_names_resolve_through_the_password_database() {
        assert_eq!(uid_of("root").unwrap(), Some(0));
        assert_eq!(uid_of("no-such-user-outpost").unwrap(), None);
    }
}
