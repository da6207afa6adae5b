//! Targets and the device-to-device ACL (DESIGN §6), as plain values: the
//! queue core resolves them against its device table, the config file and
//! the admin API only parse them.
//!
//! - `dev-7`: one device.
//! - `tag:line-3`: broadcast, one child command per device with the tag.
//! - `cap:camera`: any one connected device with the capability.
//! - `edge-1/dev-7`: through a downstream box, a gateway device enrolled
//!   with [`GATEWAY_TAG`] (upstream sync).

use serde::{Deserialize, Serialize};

/// The reserved tag of a device that is a box below this one (an edge
/// enrolled with `--gateway`): `edge/…` targets route through it.
pub const GATEWAY_TAG: &str = "outpost:gateway";

/// The longest target, tag or capability name accepted.
pub const MAX_NAME: usize = 255;

/// A parsed `send` target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// `dev-7`: one device, by id.
    Device(&'a str),
    /// `tag:T`: a broadcast, one child per device with tag T.
    Tag(&'a str),
    /// `cap:C`: a pool; one connected device with capability C runs it.
    Cap(&'a str),
    /// `edge/rest`: a command for a box below this one.
    Edge {
        /// The box below: the id of its gateway device here.
        edge: &'a str,
        /// The target as that box resolves it (itself maybe `edge/…`).
        rest: &'a str,
    },
}

/// Why a target, tag or capability name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a valid {what}: {why}")]
pub struct NameError {
    /// The name or target as given.
    pub text: String,
    /// What it was meant to be (`device id`, `tag`, `target` and the like).
    pub what: &'static str,
    /// The rule it broke, for the operator.
    pub why: &'static str,
}

/// Check a device id, tag or capability name: printable, no spaces, and
/// none of the characters that give a target its meaning.
pub fn check_name(text: &str, what: &'static str) -> Result<(), NameError> {
    let why = if text.is_empty() {
        Some("it is empty")
    } else if text.len() > MAX_NAME {
        Some("it is longer than 255 bytes")
    } else if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("it contains spaces or control characters")
    } else if text.contains([':', '/', '*']) {
        Some("`:`, `/` and `*` are reserved for targets (tag:…, cap:…, edge/…)")
    } else {
        None
    };
    match why {
        Some(why) => Err(NameError {
            text: text.to_string(),
            what,
            why,
        }),
        None => Ok(()),
    }
}

impl<'a> Target<'a> {
    /// What the box at the end of the path resolves: `edge-1/sub-1/tag:x`
    /// is `tag:x` on `sub-1`, however many boxes it passes (a check of one
    /// level, `rest` alone, took `sub-1/tag:x` for a device). Anything
    /// else is itself.
    pub fn last(self) -> Target<'a> {
        let mut t = self;
        while let Target::Edge { rest, .. } = t {
            match Target::parse(rest) {
                Ok(next) => t = next,
                // `parse` checked every level already.
                Err(_) => break,
            }
        }
        t
    }

    /// Parse `dev-7`, `tag:T`, `cap:C` or `edge/…`.
    pub fn parse(text: &'a str) -> Result<Self, NameError> {
        if let Some((edge, rest)) = text.split_once('/') {
            check_name(edge, "edge box name")?;
            // What follows is the edge's own target; it parses it.
            Target::parse(rest)?;
            return Ok(Target::Edge { edge, rest });
        }
        let bad = |why| NameError {
            text: text.to_string(),
            what: "target",
            why,
        };
        match text.split_once(':') {
            Some(("tag", t)) => check_name(t, "tag").map(|()| Target::Tag(t)),
            Some(("cap", c)) => check_name(c, "capability").map(|()| Target::Cap(c)),
            Some(_) => Err(bad(
                "use a device id (dev-7), tag:NAME (broadcast) or cap:NAME (any capable device)",
            )),
            None => check_name(text, "device id").map(|()| Target::Device(text)),
        }
    }
}

/// One ACL rule: devices matching any `from` pattern may address targets
/// matching any `to` pattern.
///
/// Patterns: `*` (anything), a device id, `tag:T` (a device with tag T, or
/// the broadcast target `tag:T` itself), `cap:C` (a device with the
/// capability, or the target `cap:C` itself).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// Patterns of the sending devices.
    pub from: Vec<String>,
    /// Patterns of the targets they may address.
    pub to: Vec<String>,
}

/// Which devices may send commands to which targets. Empty: nobody may
/// (default deny).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<AclRule>,
}

/// What the ACL needs to know of a device.
pub trait Labels {
    /// It carries tag `tag` (for `tag:` patterns).
    fn has_tag(&self, tag: &str) -> bool;
    /// It is enrolled with capability `cap` (for `cap:` patterns).
    fn has_cap(&self, cap: &str) -> bool;
}

impl Acl {
    /// Check every pattern once, so a typo fails at start, not at the
    /// first message that would have matched.
    pub fn new(rules: Vec<AclRule>) -> Result<Self, NameError> {
        for r in &rules {
            for p in r.from.iter().chain(&r.to) {
                if p != "*" {
                    Target::parse(p)?;
                }
            }
        }
        Ok(Acl { rules })
    }

    /// No rules: every device-to-device send is refused.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// May device `sender` address `target`? `device` looks up a device's
    /// labels (for `tag:`/`cap:` patterns against a direct target).
    pub fn allows<'d, L: Labels + 'd>(
        &self,
        sender_id: &str,
        sender: &L,
        target: &str,
        device: impl Fn(&str) -> Option<&'d L>,
    ) -> bool {
        self.rules.iter().any(|r| {
            r.from.iter().any(|p| matches(p, sender_id, Some(sender)))
                && r.to.iter().any(|p| {
                    p == "*" || p == target || {
                        // A direct target matched by its labels.
                        match Target::parse(target) {
                            Ok(Target::Device(d)) => matches(p, d, device(d)),
                            _ => false,
                        }
                    }
                })
        })
    }
}

fn matches<L: Labels>(pattern: &str, id: &str, labels: Option<&L>) -> bool {
    if pattern == "*" || pattern == id {
        return true;
    }
    match (Target::parse(pattern), labels) {
        (Ok(Target::Tag(t)), Some(l)) => l.has_tag(t),
        (Ok(Target::Cap(c)), Some(l)) => l.has_cap(c),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct D(&'static [&'static str], &'static [&'static str]);
    impl Labels for D {
        fn has_tag(&self, tag: &str) -> bool {
            self.0.contains(&tag)
        }
        fn has_cap(&self, cap: &str) -> bool {
            self.1.contains(&cap)
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("dev-7"), Ok(Target::Device("dev-7")));
        assert_eq!(Target::parse("tag:line-3"), Ok(Target::Tag("line-3")));
        assert_eq!(Target::parse("cap:camera"), Ok(Target::Cap("camera")));
        assert_eq!(
            Target::parse("edge-1/tag:x"),
            Ok(Target::Edge {
                edge: "edge-1",
                rest: "tag:x"
            })
        );
        for (text, last) in [
            ("edge-1/tag:x", Target::Tag("x")),
            ("edge-1/sub-1/tag:x", Target::Tag("x")),
            ("a/b/c/cap:cam", Target::Cap("cam")),
            ("edge-1/sub-1/dev-0", Target::Device("dev-0")),
            ("dev-0", Target::Device("dev-0")),
        ] {
            assert_eq!(Target::parse(text).unwrap().last(), last, "{text}");
        }
        for bad in [
            "", "tag:", "cap:", "foo:bar", "a b", "tag:a:b", "e/", "/d", "*",
        ] {
            let e = Target::parse(bad).unwrap_err();
            assert!(!e.to_string().is_empty(), "{bad}");
        }
        assert!(Target::parse(&"x".repeat(256)).is_err());
    }

    #[test]
    fn acl_is_default_deny_and_matches_ids_tags_caps() {
        let sensor = D(&["sensors"], &[]);
        let cam = D(&["line-3"], &["camera"]);
        let lookup = |id: &str| (id == "cam-1").then_some(&cam);
        assert!(!Acl::default().allows("s1", &sensor, "cam-1", lookup));

        let acl = Acl::new(vec![AclRule {
            from: vec!["tag:sensors".into()],
            to: vec!["tag:line-3".into(), "cap:printer".into()],
        }])
        .unwrap();
        // By the target's own text and by the direct target's labels.
        assert!(acl.allows("s1", &sensor, "tag:line-3", lookup));
        assert!(acl.allows("s1", &sensor, "cap:printer", lookup));
        assert!(acl.allows("s1", &sensor, "cam-1", lookup));
        assert!(!acl.allows("s1", &sensor, "cap:camera", lookup));
        assert!(!acl.allows("s1", &sensor, "other", lookup));
        // The sender must match `from`.
        assert!(!acl.allows("c", &cam, "tag:line-3", lookup));

        let any = Acl::new(vec![AclRule {
            from: vec!["s1".into()],
            to: vec!["*".into()],
        }])
        .unwrap();
        assert!(any.allows("s1", &sensor, "anything", lookup));
        assert!(!any.allows("s2", &sensor, "anything", lookup));

        assert!(Acl::new(vec![AclRule {
            from: vec!["bad:x".into()],
            to: vec![],
        }])
        .is_err());
    }
}
