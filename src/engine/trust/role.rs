//! Who may do what: the three roles, the verbs they grant, and the target
//! patterns that bound an operator. Sans IO: the admin socket (by the
//! caller's uid), the HTTP API (by token) and the trust set (by signing key)
//! all ask the same question here, so the matrix is written once.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A role, from least to most power. `Ord` follows that order: a role may do
/// what every lower role may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Reads: status, devices, show, queue, watch, workflow show/list.
    Viewer,
    /// A viewer who may also send, cancel and retry, within its targets.
    Operator,
    /// Everything: enroll, revoke, tag, trust, audit, config.
    Admin,
}

impl Role {
    /// Every role, from least to most power.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The role's name as the config, `--role` and a bundle's `trust =`
    /// lines write it (lowercase; `FromStr` takes any case).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether this role grants `verb` (targets aside: see [`Grant`]).
    pub fn allows(self, verb: Verb) -> bool {
        self >= verb.needs()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role `{other}` (use viewer, operator or admin)"
            )),
        }
    }
}

/// What a caller asks to do. Each admin request, HTTP route and signed
/// command maps to one of these; the role it needs is [`Verb::needs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verb {
    /// Status, devices, show, queue, watch, workflow show/list, metrics.
    Read,
    /// Send a command (or run a workflow) to a target.
    Send,
    /// Cancel a command or a workflow run, or pause or resume a rollout
    /// (each changes what is sent).
    Cancel,
    /// Put a dead or failed command back in the queue with fresh attempts.
    Retry,
    /// Enroll a device: mint its certificate and bundle.
    Enroll,
    /// Revoke a device's certificate.
    Revoke,
    /// Change a device's tags and capabilities.
    Tag,
    /// Add, list or remove operator keys.
    Trust,
    /// Read the audit log.
    Audit,
    /// Act on the box itself; today only a backup, which holds the CA key
    /// (whoever has it can mint devices).
    Config,
}

impl Verb {
    /// The least role that may do this.
    pub fn needs(self) -> Role {
        match self {
            Verb::Read => Role::Viewer,
            Verb::Send | Verb::Cancel | Verb::Retry => Role::Operator,
            Verb::Enroll | Verb::Revoke | Verb::Tag | Verb::Trust | Verb::Audit | Verb::Config => {
                Role::Admin
            }
        }
    }

    /// Whether the verb acts on a command's target, so an operator's
    /// target patterns bound it.
    pub fn is_targeted(self) -> bool {
        matches!(self, Verb::Send | Verb::Cancel | Verb::Retry)
    }

    /// The verb's name, as refusals print it (`` `enroll` needs the admin
    /// role``).
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Read => "read",
            Verb::Send => "send",
            Verb::Cancel => "cancel",
            Verb::Retry => "retry",
            Verb::Enroll => "enroll",
            Verb::Revoke => "revoke",
            Verb::Tag => "tag",
            Verb::Trust => "trust",
            Verb::Audit => "audit",
            Verb::Config => "config",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A target pattern: a target as written (`dev-7`, `tag:line-3`,
/// `edge-1/cap:camera`) in which `*` stands for any run of characters,
/// `/` included. `*` alone is every target.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pattern(String);

impl Pattern {
    /// A pattern from its text, trimmed. Refused, with the reason, if empty
    /// or holding whitespace or a control character.
    pub fn new(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("an empty target pattern matches nothing; use `*` for every target".into());
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "target pattern `{t}` has a space or control character"
            ));
        }
        Ok(Pattern(t.to_string()))
    }

    /// The pattern as written (as `trust list` and `trust =` lines show it).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `target` matches. Greedy-free glob: split on `*`, the first
    /// piece anchors the start, the last the end, the rest in order between.
    pub fn matches(&self, target: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or("");
        let Some(mut rest) = target.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty(); // no `*`: an exact match
        };
        for piece in middle {
            match rest.find(piece) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::new(s)
    }
}

/// A caller's authority: its role and, for targeted verbs, the targets it
/// may act on (empty: every target).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// What the caller may do.
    pub role: Role,
    /// The patterns that bound its targeted verbs (send, cancel, retry);
    /// empty: every target. `check` does not apply them to an admin.
    pub targets: Vec<Pattern>,
}

/// Why a [`Grant`] does not cover a request. The text names the role or
/// pattern needed, so the operator knows whom to ask for what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The caller's role is below the one the verb needs.
    #[error("`{verb}` needs the {needs} role; {who} has {has}")]
    Role {
        /// What the caller asked to do.
        verb: Verb,
        /// The least role that may (`Verb::needs`).
        needs: Role,
        /// The caller's role.
        has: Role,
        /// The caller, as refusals name it (`uid 1000`, ``token `ci` ``).
        who: String,
    },
    /// The target matches none of the caller's patterns.
    #[error("{who} may {verb} only to targets matching {patterns}; `{target}` is not one of them")]
    Target {
        /// What the caller asked to do.
        verb: Verb,
        /// The target it asked to do it to.
        target: String,
        /// The caller's patterns, each in backticks, joined by `, `.
        patterns: String,
        /// The caller, as refusals name it.
        who: String,
    },
    /// The caller has no role at all (default deny): an admin socket caller
    /// whose uid the config's `[[access]]` does not name, or whose peer
    /// credentials could not be read.
    #[error("{who} is not mapped to any role (default deny); an admin maps it in the config ([[access]] or http token roles)")]
    Unmapped {
        /// The caller, as refusals name it.
        who: String,
    },
}

impl Grant {
    /// A grant of `role` on every target.
    pub fn new(role: Role) -> Self {
        Grant {
            role,
            targets: Vec::new(),
        }
    }

    /// Whether this grant covers `verb` on `target` (`None` for verbs that
    /// name no target). `who` names the caller in the refusal.
    pub fn check(&self, who: &str, verb: Verb, target: Option<&str>) -> Result<(), Denied> {
        if !self.role.allows(verb) {
            return Err(Denied::Role {
                verb,
                needs: verb.needs(),
                has: self.role,
                who: who.to_string(),
            });
        }
        // Admins are not bounded by patterns: they can change them anyway.
        if verb.is_targeted() && self.role < Role::Admin && !self.targets.is_empty() {
            if let Some(t) = target {
                if !self.targets.iter().any(|p| p.matches(t)) {
                    return Err(Denied::Target {
                        verb,
                        target: t.to_string(),
                        patterns: self
                            .targets
                            .iter()
                            .map(|p| format!("`{p}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        who: who.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    #[test]
    fn patterns_match_as_globs() {
        assert!(p("*").matches("dev-1"));
        assert!(p("*").matches(""));
        assert!(p("dev-7").matches("dev-7"));
        assert!(!p("dev-7").matches("dev-70"));
        assert!(p("dev-*").matches("dev-70"));
        assert!(!p("dev-*").matches("edge-1/dev-7"));
        assert!(p("edge-1/*").matches("edge-1/tag:line-3"));
        assert!(!p("edge-1/*").matches("edge-10/dev-1"));
        assert!(p("*/tag:line-3").matches("edge-2/tag:line-3"));
        assert!(p("a*b*c").matches("axxbyyc"));
        assert!(!p("a*b*c").matches("axxcyyb"));
        // The end piece may not overlap what the start took.
        assert!(!p("ab*ba").matches("aba"));
        assert!(Pattern::new(" ").is_err());
        assert!(Pattern::new("a b").is_err());
    }

    #[test]
    fn the_role_matrix() {
        use Verb::*;
        let all = [
            Read, Send, Cancel, Retry, Enroll, Revoke, Tag, Trust, Audit, Config,
        ];
        for v in all {
            assert!(Role::Admin.allows(v), "{v}");
            assert_eq!(Role::Viewer.allows(v), v == Read, "{v}");
            assert_eq!(
                Role::Operator.allows(v),
                matches!(v, Read | Send | Cancel | Retry),
                "{v}"
            );
        }
    }

    #[test]
    fn operators_are_bounded_by_their_patterns() {
        let g = Grant {
            role: Role::Operator,
            targets: vec![p("tag:line-3"), p("dev-*")],
        };
        assert!(g.check("uid 1000", Verb::Send, Some("dev-4")).is_ok());
        assert!(g.check("uid 1000", Verb::Send, Some("tag:line-3")).is_ok());
        let e = g
            .check("uid 1000", Verb::Send, Some("tag:line-4"))
            .unwrap_err();
        assert!(e.to_string().contains("`tag:line-3`, `dev-*`"), "{e}");
        let e = g.check("uid 1000", Verb::Enroll, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`enroll` needs the admin role; uid 1000 has operator"
        );
        assert!(Grant::new(Role::Admin)
            .check("root", Verb::Send, Some("x"))
            .is_ok());
    }
}
