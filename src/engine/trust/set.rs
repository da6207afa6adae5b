//! The trust set: whose signatures count, for what. Kept as one record in
//! the box's store and written into each device's bundle.

use super::envelope::{self, Malformed};
use super::key::{KeyId, OperatorPublic};
use super::role::{Grant, Pattern, Role};
use crate::engine::command::{CommandId, Millis, Priority};
use serde::{Deserialize, Serialize};

/// A key the set trusts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKey {
    /// Its id (the SHA-256 fingerprint): what a signed envelope's claims
    /// name it by.
    pub id: KeyId,
    /// The name it was added under (the `.pub` comment unless given).
    pub name: String,
    /// The raw ed25519 public key signatures are checked against.
    pub public: [u8; 32],
    /// Its role and target patterns: signing needs at least operator, and
    /// the patterns (an admin's too) bound the targets it may sign for.
    pub grant: Grant,
    /// When it was added or last replaced, ms since the Unix epoch; 0 in a
    /// device's bundle, which does not carry it.
    pub added_at: Millis,
}

/// A key taken out of the set: commands it signed that are not yet
/// delivered end `Rejected` with this record's time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedKey {
    /// The removed key's id.
    pub id: KeyId,
    /// The name it was listed under, for the refusals that name it.
    pub name: String,
    /// When it was removed, ms since the Unix epoch.
    pub removed_at: Millis,
}

/// A box's trust set: the operator keys whose signatures count, each with
/// its grant, and the keys taken out of it. A box edits it only through
/// its writer (a `TrustEdit`); a device's bundle carries a copy without the
/// removals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustSet {
    /// The trusted keys, in the order added (a replaced key moves last).
    pub keys: Vec<TrustedKey>,
    /// The keys removed, kept so that what they signed is refused by name
    /// and time (`RemovedSigner`), not as unknown. A key added again leaves
    /// this list.
    pub removed: Vec<RemovedKey>,
}

/// Why a signed (or unsigned) command is refused. Each names the step of
/// DESIGN §10's order that failed and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    /// The box (or device) requires signatures and the command carries no
    /// signed envelope: none, or an unsigned one.
    #[error("unsigned: this box requires commands signed by a trusted operator key (sign with `outpost send --sign KEY`, or the envelope_b64 field over HTTP)")]
    Unsigned,
    /// The envelope could not be read at all.
    #[error("{0}")]
    Malformed(#[from] Malformed),
    /// Signed by a key the set does not hold and has no removal of (a
    /// device's bundle carries no removals, so there a removed key is this).
    #[error("signed by key {0}, which this box does not trust (add it with `outpost trust add KEY.pub --role operator`)")]
    UnknownSigner(KeyId),
    /// Signed by a key since removed from the set: refused at intake, and
    /// at delivery for what it signed that is still queued.
    #[error("signed by key {id} ({name}), which was removed from the trust set at {}", crate::engine::command::rfc3339(*at))]
    RemovedSigner {
        /// The signer's key id.
        id: KeyId,
        /// The name it was listed under.
        name: String,
        /// When it was removed, ms since the Unix epoch.
        at: Millis,
    },
    /// The signer's role is below operator: a viewer's key signs nothing.
    #[error("key {name} has the {role} role; sending needs the operator role")]
    Role {
        /// The name the signer is listed under.
        name: String,
        /// Its role.
        role: Role,
    },
    /// The signed target matches none of the signer's patterns.
    #[error(
        "key {name} may sign only for targets matching {patterns}; `{target}` is not one of them"
    )]
    OutOfScope {
        /// The name the signer is listed under.
        name: String,
        /// The target as signed.
        target: String,
        /// The signer's patterns, each in backticks, joined by `, `.
        patterns: String,
    },
    /// The signature does not verify with the trusted key the claims name:
    /// forged, or the claims changed after signing. The id is that key's.
    #[error(
        "bad signature: the envelope was not signed by key {0}, or it was changed after signing"
    )]
    BadSignature(KeyId),
    /// The command as it arrived differs from what was signed in one field.
    #[error("the command's {field} is not the one signed (signed {signed}, got {got}): changed in flight")]
    Mismatch {
        /// Which: `id`, `payload`, `priority`, `not-before` or `target`.
        field: String,
        /// The signed value as text (a payload as `sha256 HEX`, a time as
        /// RFC 3339 or `none`).
        signed: String,
        /// The value that arrived, in the same form.
        got: String,
    },
    /// Signed for another box: the audience is neither this box nor one
    /// below it on the target's path (at a device: not its box).
    #[error("the command is signed for `{signed}`, not for this box (`{here}`)")]
    WrongAudience {
        /// The audience the claims name.
        signed: String,
        /// This box's name (at a device, its box's).
        here: String,
    },
    /// The signature's expiry (ms since the Unix epoch) has passed.
    #[error("the signature expired at {}; sign it again", crate::engine::command::rfc3339(*.0))]
    Expired(Millis),
    /// At a device only: the signed not-before (ms since the Unix epoch) is
    /// more than `SKEW_MS` ahead of its clock. A box queues such a command
    /// to wait instead.
    #[error("the signature is not valid before {}; check this clock or the signer's", crate::engine::command::rfc3339(*.0))]
    NotYetValid(Millis),
    /// A signed command id already accepted here: found by the queue's core
    /// (its known ids) or a device's `Guard` (the ids it has seen), never by
    /// `TrustSet::verify`.
    #[error("replay: command {0} was already accepted here; a signed command runs once")]
    Replay(CommandId),
}

impl Refusal {
    /// A short stable name, for the audit log and metrics.
    pub fn step(&self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::Malformed(_) => "malformed",
            Refusal::UnknownSigner(_) => "unknown_signer",
            Refusal::RemovedSigner { .. } => "removed_signer",
            Refusal::Role { .. } => "role",
            Refusal::OutOfScope { .. } => "out_of_scope",
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::Mismatch { .. } => "mismatch",
            Refusal::WrongAudience { .. } => "wrong_audience",
            Refusal::Expired(_) => "expired",
            Refusal::NotYetValid(_) => "not_yet_valid",
            Refusal::Replay(_) => "replay",
        }
    }
}

/// Where the command is seen from.
#[derive(Clone, Copy, Debug)]
pub enum Seat<'a> {
    /// A box named `name`, at intake, with the target as it is queued here
    /// (`dev-7` on the edge for the hub's `edge-1/dev-7`).
    Box {
        /// This box's name: the audience it answers to.
        name: &'a str,
        /// The target as queued here.
        target: &'a str,
    },
    /// A device `id` under the box `name` (the target is not on the wire:
    /// the claims' must name the device, or a tag or capability, which the
    /// device takes on its box's word).
    Device {
        /// The name of the box the device is enrolled under (its bundle's
        /// `box =`).
        name: &'a str,
        /// The device's id, as in its certificate.
        id: &'a str,
    },
}

/// The command as it arrived, to compare with what was signed.
#[derive(Clone, Copy, Debug)]
pub struct Presented<'a> {
    /// The id the command has here: at a box the hub's or the envelope's
    /// (see `Intake::id`), at a device the frame's.
    pub id: CommandId,
    /// The payload as it arrived; its SHA-256 must be the signed one.
    pub payload: &'a [u8],
    /// The priority it is queued or delivered at.
    pub priority: Priority,
    /// Its not-before, ms since the Unix epoch (`None`: none). A device
    /// passes the signed one, as its frame carries none.
    pub not_before: Option<Millis>,
}

/// A verified envelope's facts the caller keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The signed command id (a broadcast child's own id differs).
    pub id: CommandId,
    /// The signing key's id.
    pub key_id: KeyId,
    /// The name the set lists the signing key under.
    pub signer: String,
    /// When the signature expires, ms since the Unix epoch: how long the
    /// signed id must be remembered to refuse a replay.
    pub expires_at: Millis,
}

/// Slack for clocks that disagree, on the not-before side only: an expired
/// signature is never taken, a fresh one from a fast clock is.
pub const SKEW_MS: Millis = 5 * 60 * 1000;

/// A change to the trust set (an admin's `trust add` or `trust remove`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrustEdit {
    /// Trust a key, or replace the name and grant of one already trusted;
    /// a removed key may be added again.
    Add {
        /// The `.pub` line.
        public: String,
        /// The name to list it under (`None`: the `.pub` comment); refused
        /// if another key has it.
        name: Option<String>,
        /// Its role and target patterns.
        grant: Grant,
    },
    /// By key id (`SHA256:…`) or name.
    Remove {
        /// The key's id or the name it is listed under, as given.
        key: String,
    },
}

/// Why a trust edit was not made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum EditError {
    /// The `.pub` line is not an ed25519 OpenSSH public key: the
    /// `KeyError`'s text.
    #[error("{0}")]
    BadKey(String),
    /// No trusted key has this id or name (as given to the removal).
    #[error("no key `{0}` in the trust set (see `outpost trust list`)")]
    NoSuchKey(String),
    /// Another trusted key is listed under this name.
    #[error("the name `{0}` is taken by another key; remove it first or pick another --name")]
    NameTaken(String),
}

impl TrustSet {
    /// Apply an edit; the key added or removed.
    pub fn apply(&mut self, edit: &TrustEdit, now: Millis) -> Result<TrustedKey, EditError> {
        match edit {
            TrustEdit::Add {
                public,
                name,
                grant,
            } => {
                let p = OperatorPublic::from_openssh(public)
                    .map_err(|e| EditError::BadKey(e.to_string()))?;
                let wanted = name.clone().unwrap_or_else(|| p.comment.clone());
                if self.keys.iter().any(|k| k.name == wanted && k.id != p.id) {
                    return Err(EditError::NameTaken(wanted));
                }
                self.add(&p, name.as_deref(), grant.clone(), now);
                Ok(self.key(&p.id).cloned().expect("just added"))
            }
            TrustEdit::Remove { key } => self
                .remove(key, now)
                .ok_or_else(|| EditError::NoSuchKey(key.clone())),
        }
    }

    /// The trusted key with this id; `None` if it is not in the set (never
    /// added, or removed).
    pub fn key(&self, id: &KeyId) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| &k.id == id)
    }

    /// The removal of the key with this id; `None` if it was never removed,
    /// or was added again since.
    pub fn removed(&self, id: &KeyId) -> Option<&RemovedKey> {
        self.removed.iter().find(|k| &k.id == id)
    }

    /// Add (or replace) a key. A key once removed may be added again.
    pub fn add(&mut self, public: &OperatorPublic, name: Option<&str>, grant: Grant, now: Millis) {
        self.removed.retain(|r| r.id != public.id);
        self.keys.retain(|k| k.id != public.id);
        let name = name
            .map(str::to_string)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| public.comment.clone());
        self.keys.push(TrustedKey {
            id: public.id,
            name,
            public: public.raw,
            grant,
            added_at: now,
        });
    }

    /// Remove a key by id or name; the removed key, if it was there.
    pub fn remove(&mut self, which: &str, now: Millis) -> Option<TrustedKey> {
        let id = which.parse::<KeyId>().ok();
        let at = self
            .keys
            .iter()
            .position(|k| Some(k.id) == id || k.name == which)?;
        let k = self.keys.remove(at);
        self.removed.push(RemovedKey {
            id: k.id,
            name: k.name.clone(),
            removed_at: now,
        });
        Some(k)
    }

    /// Verify an envelope in DESIGN §10's order: size → signer trusted and
    /// allowed the target → signature → fields as signed → audience →
    /// time. Replays are the caller's (it holds the ids seen). `now`
    /// `None`: a device without a trustworthy clock skips the time step.
    pub fn verify(
        &self,
        envelope: &[u8],
        seat: Seat<'_>,
        cmd: Presented<'_>,
        now: Option<Millis>,
    ) -> Result<Verified, Refusal> {
        let o = envelope::open(envelope)?;
        let c = &o.claims;
        let Some(k) = self.key(&c.key_id) else {
            return Err(match self.removed(&c.key_id) {
                Some(r) => Refusal::RemovedSigner {
                    id: r.id,
                    name: r.name.clone(),
                    at: r.removed_at,
                },
                None => Refusal::UnknownSigner(c.key_id),
            });
        };
        if k.grant.role < Role::Operator {
            return Err(Refusal::Role {
                name: k.name.clone(),
                role: k.grant.role,
            });
        }
        if !k.grant.targets.is_empty() && !k.grant.targets.iter().any(|p| p.matches(&c.target)) {
            return Err(Refusal::OutOfScope {
                name: k.name.clone(),
                target: c.target.clone(),
                patterns: patterns(&k.grant.targets),
            });
        }
        if !super::key::verify(&k.public, o.signed, &o.signature) {
            return Err(Refusal::BadSignature(k.id));
        }
        // A broadcast's children carry ids of their own (one per device):
        // a device takes those on its box's word, and dedupes by the
        // signed id, so a box cannot make it run twice under two ids.
        let group = {
            let last = c.target.rsplit('/').next().unwrap_or("");
            last.starts_with("tag:") || last.starts_with("cap:")
        };
        if !(group && matches!(seat, Seat::Device { .. })) {
            compare("id", c.id, cmd.id)?;
        }
        if c.payload_sha256 != envelope::payload_digest(cmd.payload) {
            return Err(Refusal::Mismatch {
                field: "payload".into(),
                signed: format!("sha256 {}", hex::encode(c.payload_sha256)),
                got: format!(
                    "sha256 {}",
                    hex::encode(envelope::payload_digest(cmd.payload))
                ),
            });
        }
        compare("priority", c.priority, cmd.priority)?;
        compare_opt("not-before", c.not_before, cmd.not_before)?;
        match seat {
            Seat::Box { name, target } => {
                if !relative(&c.target, target) {
                    return Err(Refusal::Mismatch {
                        field: "target".into(),
                        signed: c.target.clone(),
                        got: target.to_string(),
                    });
                }
                // Meant for this box, or for a box below it on the path.
                let below = target.split('/').rev().skip(1).any(|g| g == c.audience);
                if c.audience != name && !below {
                    return Err(wrong_audience(c, name));
                }
            }
            Seat::Device { name, id } => {
                let last = c.target.rsplit('/').next().unwrap_or("");
                if last != id && !group {
                    return Err(Refusal::Mismatch {
                        field: "target".into(),
                        signed: c.target.clone(),
                        got: id.to_string(),
                    });
                }
                if c.audience != name {
                    return Err(wrong_audience(c, name));
                }
            }
        }
        if let Some(now) = now {
            if now >= c.expires_at {
                return Err(Refusal::Expired(c.expires_at));
            }
            if let Some(nb) = c.not_before {
                // At a device only: a box queues it to wait until then.
                if matches!(seat, Seat::Device { .. }) && now + SKEW_MS < nb {
                    return Err(Refusal::NotYetValid(nb));
                }
            }
        }
        Ok(Verified {
            id: c.id,
            key_id: k.id,
            signer: k.name.clone(),
            expires_at: c.expires_at,
        })
    }
}

fn wrong_audience(c: &envelope::Claims, here: &str) -> Refusal {
    Refusal::WrongAudience {
        signed: c.audience.clone(),
        here: here.to_string(),
    }
}

/// The target as queued here is the signed one, or its tail below the
/// boxes it was forwarded through (`edge-1/dev-7` → `dev-7`).
fn relative(signed: &str, here: &str) -> bool {
    signed == here
        || signed
            .strip_suffix(here)
            .is_some_and(|head| head.ends_with('/'))
}

fn compare<T: PartialEq + std::fmt::Display>(
    field: &'static str,
    signed: T,
    got: T,
) -> Result<(), Refusal> {
    if signed == got {
        return Ok(());
    }
    Err(Refusal::Mismatch {
        field: field.into(),
        signed: signed.to_string(),
        got: got.to_string(),
    })
}

fn compare_opt(
    field: &'static str,
    signed: Option<Millis>,
    got: Option<Millis>,
) -> Result<(), Refusal> {
    let show = |v: Option<Millis>| v.map_or("none".to_string(), crate::engine::command::rfc3339);
    if signed == got {
        return Ok(());
    }
    Err(Refusal::Mismatch {
        field: field.into(),
        signed: show(signed),
        got: show(got),
    })
}

fn patterns(ps: &[Pattern]) -> String {
    ps.iter()
        .map(|p| format!("`{p}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::envelope::{payload_digest, seal, Claims};
    use super::super::key::OperatorKey;
    use super::*;

    const NOW: Millis = 1_700_000_000_000;

    struct Fix {
        alice: OperatorKey,
        set: TrustSet,
    }

    fn fix() -> Fix {
        let alice = OperatorKey::generate("alice").unwrap();
        let mut set = TrustSet::default();
        set.add(&alice.public, None, Grant::new(Role::Operator), NOW - 1);
        Fix { alice, set }
    }

    fn claims(k: &OperatorKey, target: &str, audience: &str) -> Claims {
        Claims {
            id: CommandId::new(NOW, 1),
            target: target.into(),
            payload_sha256: payload_digest(b"reboot"),
            artifact: None,
            priority: Priority::Normal,
            not_before: None,
            expires_at: NOW + 3_600_000,
            audience: audience.into(),
            key_id: k.public.id,
        }
    }

    fn cmd(id: CommandId) -> Presented<'static> {
        Presented {
            id,
            payload: b"reboot",
            priority: Priority::Normal,
            not_before: None,
        }
    }

    fn at_box<'a>(name: &'a str, target: &'a str) -> Seat<'a> {
        Seat::Box { name, target }
    }

    #[test]
    fn a_good_envelope_verifies_at_every_hop() {
        let f = fix();
        let c = claims(&f.alice, "edge-1/dev-7", "edge-1");
        let env = seal(&c, &f.alice).unwrap();
        let ok = |seat| f.set.verify(&env, seat, cmd(c.id), Some(NOW));
        // The hub (the audience is the edge below it), the edge, the device.
        assert_eq!(ok(at_box("hub", "edge-1/dev-7")).unwrap().signer, "alice");
        ok(at_box("edge-1", "dev-7")).unwrap();
        ok(Seat::Device {
            name: "edge-1",
            id: "dev-7",
        })
        .unwrap();
        // A device without a clock still checks everything else.
        f.set
            .verify(
                &env,
                Seat::Device {
                    name: "edge-1",
                    id: "dev-7",
                },
                cmd(c.id),
                None,
            )
            .unwrap();
    }

    #[test]
    fn each_step_refuses_with_its_reason() {
        let f = fix();
        let c = claims(&f.alice, "dev-7", "box-a");
        let env = seal(&c, &f.alice).unwrap();
        let v = |env: &[u8], seat, p: Presented<'_>, now| f.set.verify(env, seat, p, now);
        let here = at_box("box-a", "dev-7");

        // A forged signature: the claims changed after signing (another
        // target, the original signature).
        let sig = envelope::open(&env).unwrap().signature;
        let mut other = c.clone();
        other.target = "dev-8".into();
        let forged = envelope::forge(&other, &sig);
        let e = v(&forged, at_box("box-a", "dev-8"), cmd(c.id), Some(NOW)).unwrap_err();
        assert_eq!(e.step(), "bad_signature", "{e}");

        // A wrong key: signed by a key the set does not hold.
        let mallory = OperatorKey::generate("mallory").unwrap();
        let m = seal(&claims(&mallory, "dev-7", "box-a"), &mallory).unwrap();
        assert_eq!(
            v(&m, here, cmd(c.id), Some(NOW)).unwrap_err().step(),
            "unknown_signer"
        );
        // A trusted key's id on another key's signature.
        let mut stolen = claims(&mallory, "dev-7", "box-a");
        stolen.key_id = f.alice.public.id;
        let s = seal(&stolen, &mallory).unwrap();
        assert_eq!(
            v(&s, here, cmd(c.id), Some(NOW)).unwrap_err().step(),
            "bad_signature"
        );

        // The payload, the target, the box: all as signed.
        let mut p = cmd(c.id);
        p.payload = b"rm -rf /";
        let e = v(&env, here, p, Some(NOW)).unwrap_err();
        assert!(
            e.to_string().contains("payload is not the one signed"),
            "{e}"
        );
        let e = v(&env, at_box("box-a", "dev-8"), cmd(c.id), Some(NOW)).unwrap_err();
        assert_eq!(e.step(), "mismatch");
        assert!(e.to_string().contains("target"), "{e}");
        let e = v(&env, at_box("box-b", "dev-7"), cmd(c.id), Some(NOW)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the command is signed for `box-a`, not for this box (`box-b`)"
        );
        let e = v(&env, here, cmd(CommandId::new(NOW, 2)), Some(NOW)).unwrap_err();
        assert!(e.to_string().contains("id is not the one signed"), "{e}");

        // Time.
        let e = v(&env, here, cmd(c.id), Some(c.expires_at)).unwrap_err();
        assert_eq!(e.step(), "expired");
    }

    #[test]
    fn roles_patterns_and_removal_bind_the_signer() {
        let mut f = fix();
        let c = claims(&f.alice, "tag:line-3", "box-a");
        let env = seal(&c, &f.alice).unwrap();
        let here = at_box("box-a", "tag:line-3");

        f.set.add(
            &f.alice.public,
            None,
            Grant {
                role: Role::Operator,
                targets: vec![Pattern::new("dev-*").unwrap()],
            },
            NOW,
        );
        let e = f.set.verify(&env, here, cmd(c.id), Some(NOW)).unwrap_err();
        assert_eq!(e.step(), "out_of_scope");
        assert!(e.to_string().contains("`dev-*`"), "{e}");

        f.set
            .add(&f.alice.public, None, Grant::new(Role::Viewer), NOW);
        assert_eq!(
            f.set
                .verify(&env, here, cmd(c.id), Some(NOW))
                .unwrap_err()
                .step(),
            "role"
        );

        f.set
            .add(&f.alice.public, None, Grant::new(Role::Operator), NOW);
        f.set.verify(&env, here, cmd(c.id), Some(NOW)).unwrap();
        assert!(f.set.remove("alice", NOW + 5).is_some());
        let e = f.set.verify(&env, here, cmd(c.id), Some(NOW)).unwrap_err();
        assert_eq!(e.step(), "removed_signer");
        assert!(f.set.remove("alice", NOW + 6).is_none());
    }

    #[test]
    fn a_device_takes_only_what_names_it_or_a_group() {
        let f = fix();
        let dev = Seat::Device {
            name: "box-a",
            id: "dev-7",
        };
        for (target, ok) in [
            ("dev-7", true),
            ("tag:line-3", true),
            ("cap:cam", true),
            ("dev-8", false),
            ("edge/dev-7", true),
        ] {
            let c = claims(&f.alice, target, "box-a");
            let env = seal(&c, &f.alice).unwrap();
            assert_eq!(
                f.set.verify(&env, dev, cmd(c.id), Some(NOW)).is_ok(),
                ok,
                "{target}"
            );
        }
    }
}
