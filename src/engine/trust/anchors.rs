//! A device's trust anchors: what its bundle says about whose signed
//! commands it runs. Written by the box at enroll as bundle header lines,
//! read back by the device; the device has no store, so this is its whole
//! trust set.
//!
//! ```text
//! box = edge-1
//! require-signed = true
//! trust = operator dev-*,tag:line-3 ssh-ed25519 AAAA… alice
//! ```
//!
//! `key = value` lines because a v1 reader skips the keys it does not know:
//! an older device reads a newer bundle (and verifies nothing, as before).

use super::key::OperatorPublic;
use super::role::{Grant, Pattern, Role};
use super::set::TrustSet;

/// The bundle's trust section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTrust {
    /// The box's name: the audience a command for this device is signed for.
    pub box_name: String,
    /// Refuse commands that carry no envelope.
    pub require_signed: bool,
    /// The operator keys; removals are not carried (a removed key is simply
    /// unknown here).
    pub set: TrustSet,
}

/// Why the trust lines of a bundle cannot be read. The bundle parser names
/// the file around it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnchorError {
    /// The `box =` value is empty or holds whitespace or a control
    /// character; the value as read.
    #[error("`box = {0}` is not a box name (one word, no spaces)")]
    BoxName(String),
    /// The `require-signed =` value is neither `true` nor `false`; the value
    /// as read.
    #[error("`require-signed = {0}` must be `true` or `false`")]
    RequireSigned(String),
    /// A `trust =` line could not be read.
    #[error("`trust = {line}`: {why} (expected `trust = ROLE TARGETS|* ssh-ed25519 AAAA… NAME`)")]
    Line {
        /// The line's value, after `trust =`.
        line: String,
        /// What is wrong: too few fields, an unknown role, a bad pattern or
        /// key.
        why: String,
    },
    /// Trust or `require-signed` lines without a `box =` line.
    #[error("it has `trust =` or `require-signed =` lines but no `box = NAME`: a device cannot check whom a command was signed for without it")]
    NoBoxName,
}

pub(crate) fn check_box_name(name: &str) -> Result<(), AnchorError> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AnchorError::BoxName(name.to_string()));
    }
    Ok(())
}

/// The header lines being read, before they are complete.
#[derive(Default)]
pub(crate) struct Reader {
    box_name: Option<String>,
    require_signed: Option<bool>,
    set: TrustSet,
    any_key: bool,
}

impl Reader {
    /// Take `key = value` if it is one of ours; `Ok(false)` if not.
    pub(crate) fn take(&mut self, key: &str, value: &str) -> Result<bool, AnchorError> {
        match key {
            "box" => {
                check_box_name(value)?;
                self.box_name = Some(value.to_string());
            }
            "require-signed" => {
                self.require_signed = Some(match value {
                    "true" => true,
                    "false" => false,
                    v => return Err(AnchorError::RequireSigned(v.to_string())),
                })
            }
            "trust" => {
                let (public, grant) = parse_trust(value)?;
                self.set.add(&public, None, grant, 0);
                self.any_key = true;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `None` for a bundle without a trust section (an older box's): the
    /// device runs what its box delivers, as before.
    pub(crate) fn finish(self) -> Result<Option<DeviceTrust>, AnchorError> {
        let Some(box_name) = self.box_name else {
            if self.any_key || self.require_signed.is_some() {
                return Err(AnchorError::NoBoxName);
            }
            return Ok(None);
        };
        Ok(Some(DeviceTrust {
            box_name,
            require_signed: self.require_signed.unwrap_or(false),
            set: self.set,
        }))
    }
}

fn parse_trust(value: &str) -> Result<(OperatorPublic, Grant), AnchorError> {
    let bad = |why: String| AnchorError::Line {
        line: value.to_string(),
        why,
    };
    let mut parts = value.splitn(3, char::is_whitespace);
    let (Some(role), Some(targets), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("too few fields".into()));
    };
    let role: Role = role.parse().map_err(bad)?;
    let targets = if targets == "*" {
        Vec::new()
    } else {
        targets
            .split(',')
            .map(Pattern::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?
    };
    let public = OperatorPublic::from_openssh(key).map_err(|e| bad(e.to_string()))?;
    Ok((public, Grant { role, targets }))
}

impl DeviceTrust {
    /// The header lines, each ending in a newline.
    pub fn to_lines(&self) -> String {
        let mut s = format!(
            "box = {}\nrequire-signed = {}\n",
            self.box_name, self.require_signed
        );
        for k in &self.set.keys {
            let targets = if k.grant.targets.is_empty() {
                "*".to_string()
            } else {
                k.grant
                    .targets
                    .iter()
                    .map(Pattern::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            // The comment carries the name the box knows the key by, so the
            // device's refusals name the same key.
            let public = OperatorPublic {
                id: k.id,
                raw: k.public,
                comment: k.name.clone(),
            };
            s.push_str(&format!(
                "trust = {} {targets} {}\n",
                k.grant.role,
                public.to_openssh()
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::key::OperatorKey;
    use super::*;

    fn read(lines: &[(&str, &str)]) -> Result<Option<DeviceTrust>, AnchorError> {
        let mut r = Reader::default();
        for (k, v) in lines {
            assert!(r.take(k, v)?, "{k}");
        }
        r.finish()
    }

    #[test]
    fn trust_lines_round_trip() {
        let alice = OperatorKey::generate("alice").unwrap();
        let bob = OperatorKey::generate("bob").unwrap();
        let mut set = TrustSet::default();
        set.add(&alice.public, None, Grant::new(Role::Operator), 0);
        set.add(
            &bob.public,
            Some("bob the builder"),
            Grant {
                role: Role::Admin,
                targets: vec![
                    Pattern::new("dev-*").unwrap(),
                    Pattern::new("tag:x").unwrap(),
                ],
            },
            0,
        );
        let t = DeviceTrust {
            box_name: "edge-1".into(),
            require_signed: true,
            set,
        };
        let text = t.to_lines();
        assert!(
            text.contains("trust = admin dev-*,tag:x ssh-ed25519 "),
            "{text}"
        );
        let mut r = Reader::default();
        for line in text.lines() {
            let (k, v) = line.split_once('=').unwrap();
            assert!(r.take(k.trim(), v.trim()).unwrap());
        }
        assert_eq!(r.finish().unwrap(), Some(t));
    }

    #[test]
    fn bad_trust_lines_are_named() {
        assert_eq!(read(&[]).unwrap(), None);
        assert_eq!(
            read(&[("require-signed", "true")]).unwrap_err(),
            AnchorError::NoBoxName
        );
        assert!(matches!(
            read(&[("require-signed", "yes")]),
            Err(AnchorError::RequireSigned(_))
        ));
        let e = read(&[("box", "b"), ("trust", "root * ssh-ed25519 AAAA x")]).unwrap_err();
        assert!(e.to_string().contains("unknown role `root`"), "{e}");
        let e = read(&[("box", "b"), ("trust", "operator * ssh-rsa AAAA x")]).unwrap_err();
        assert!(e.to_string().contains("OpenSSH public key"), "{e}");
        assert!(read(&[("box", "b"), ("trust", "operator")]).is_err());
        let mut r = Reader::default();
        assert!(!r.take("label", "kiosk").unwrap());
    }
}
