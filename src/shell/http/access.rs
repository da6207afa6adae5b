//! Who calls on the HTTP listener and what they may do. A caller is known
//! by its token: `--http-token` is the dashboard's (admin, acting only
//! with `--http-admin`, as before roles), each `[[http_tokens]]` table of
//! the config carries its own role and target patterns. Without any token
//! configured, a loopback listener serves everyone as the dashboard.
//!
//! Every route is classed here in one function, [`verb_of`]; a route it
//! does not know is refused, so a new route cannot slip past the roles.

use super::{err, query_token, same, HttpOptions};
use crate::engine::trust::{Denied, Grant, Role, Verb};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use std::path::PathBuf;

/// Shortest token accepted: the same rule as `http_token`.
pub const MIN_TOKEN: usize = 16;

/// One `[[http_tokens]]` table of the config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Names the caller in refusals and logs (default: `http_tokens[N]`).
    pub name: Option<String>,
    /// The token itself, at least `MIN_TOKEN` characters once trimmed; give
    /// it or `token_file`, not both.
    pub token: Option<String>,
    /// A file whose first line is the token, kept out of the config.
    pub token_file: Option<PathBuf>,
    /// `viewer`, `operator` or `admin` (any case).
    pub role: String,
    /// Target patterns that bound its sends, cancels and retries (empty:
    /// every target).
    #[serde(default)]
    pub targets: Vec<String>,
}

/// A token and the authority it carries.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpToken {
    /// Names the caller in refusals, logs and its sends' origin: the
    /// table's `name`, else `http_tokens[N]`.
    pub name: String,
    /// The secret a request must carry, read and trimmed; never logged.
    pub token: String,
    /// The role and target patterns the token carries.
    pub grant: Grant,
}

// The token's value never goes into a log or an error.
impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpToken")
            .field("name", &self.name)
            .field("token", &"(hidden)")
            .field("grant", &self.grant)
            .finish()
    }
}

/// Why the `[[http_tokens]]` tables are unusable; `n` counts from 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Both `token` and `token_file` are given.
    #[error("[[http_tokens]] #{n}: give token or token_file, not both")]
    Both {
        /// The table's place, from 1.
        n: usize,
    },
    /// Neither `token` nor `token_file` is given.
    #[error("[[http_tokens]] #{n}: give the token (token = \"…\", or token_file = \"PATH\")")]
    Neither {
        /// The table's place, from 1.
        n: usize,
    },
    /// `token_file` cannot be read.
    #[error("[[http_tokens]] #{n}: cannot read token_file {path}: {why}")]
    Read {
        /// The table's place, from 1.
        n: usize,
        /// The file, as written.
        path: String,
        /// The IO error's text.
        why: String,
    },
    /// The token is shorter than `MIN_TOKEN` characters.
    #[error("[[http_tokens]] #{n}: the token is shorter than {MIN_TOKEN} characters; make a longer one (e.g. `openssl rand -hex 16`)")]
    Short {
        /// The table's place, from 1.
        n: usize,
    },
    /// The token is `http_token`'s or an earlier table's: a token must name
    /// one caller.
    #[error("[[http_tokens]] #{n}: the same token as {other}; one token, one caller")]
    Twice {
        /// The table's place, from 1.
        n: usize,
        /// Who has it already: `http_token`, or the earlier token's name in
        /// backticks.
        other: String,
    },
    /// The role or a target pattern is not valid.
    #[error("[[http_tokens]] #{n}: {why}")]
    Value {
        /// The table's place, from 1.
        n: usize,
        /// What is wrong, as the role or pattern parser says it.
        why: String,
    },
}

/// Check the tables and read their token files. `legacy` is `http_token`,
/// which no role token may repeat.
pub fn resolve_tokens(
    entries: &[TokenEntry],
    legacy: Option<&str>,
) -> Result<Vec<HttpToken>, TokenError> {
    let mut out: Vec<HttpToken> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let n = i + 1;
        let token = match (&e.token, &e.token_file) {
            (Some(_), Some(_)) => return Err(TokenError::Both { n }),
            (None, None) => return Err(TokenError::Neither { n }),
            (Some(t), None) => t.trim().to_string(),
            (None, Some(p)) => std::fs::read_to_string(p)
                .map_err(|e| TokenError::Read {
                    n,
                    path: p.display().to_string(),
                    why: e.to_string(),
                })?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        };
        if token.len() < MIN_TOKEN {
            return Err(TokenError::Short { n });
        }
        if legacy.is_some_and(|l| l == token) {
            return Err(TokenError::Twice {
                n,
                other: "http_token".into(),
            });
        }
        if let Some(o) = out.iter().find(|o| o.token == token) {
            return Err(TokenError::Twice {
                n,
                other: format!("`{}`", o.name),
            });
        }
        let grant = crate::shell::admin::access::grant_of(&e.role, &e.targets)
            .map_err(|why| TokenError::Value { n, why })?;
        out.push(HttpToken {
            name: e
                .name
                .clone()
                .unwrap_or_else(|| format!("http_tokens[{n}]")),
            token,
            grant,
        });
    }
    Ok(out)
}

/// The caller of one request, as the guard found it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Names it in refusals.
    pub who: String,
    /// What it may do: its token's grant, or the dashboard's (admin with
    /// `--http-admin`, else viewer).
    pub grant: Grant,
    /// It sent `Authorization: Bearer`, which a cross-site form cannot.
    pub bearer: bool,
    /// The origin its sends carry: `http`, or `http:NAME` for a token of
    /// `[[http_tokens]]`.
    pub origin: String,
}

/// The dashboard's caller (no token configured, or `--http-token`): admin
/// with `--http-admin`, else it may only read, as before roles.
fn dashboard(opts: &HttpOptions, who: &str, bearer: bool) -> Caller {
    if opts.admin {
        Caller {
            who: who.to_string(),
            grant: Grant::new(Role::Admin),
            bearer,
            origin: "http".into(),
        }
    } else {
        Caller {
            who: format!("{who} (read-only: start the box with --http-admin to act from it)"),
            grant: Grant::new(Role::Viewer),
            bearer,
            origin: "http".into(),
        }
    }
}

/// Who sent this request, or the 401 that answers it.
// The refusal is the answer itself, built once per request: boxing it
// would save nothing.
#[allow(clippy::result_large_err)]
pub(super) fn identify(
    opts: &HttpOptions,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Caller, Response> {
    if opts.token.is_none() && opts.tokens.is_empty() {
        return Ok(dashboard(opts, "the dashboard", false));
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let from_header = bearer.is_some();
    let given = bearer.or_else(|| query_token(query));
    // A wrong token and a missing one are told apart: the fix differs
    // (check the token's value vs. send one at all).
    let why = match given {
        Some(g) => {
            if opts
                .token
                .as_ref()
                .is_some_and(|t| same(g.as_bytes(), t.as_bytes()))
            {
                return Ok(dashboard(opts, "the --http-token", from_header));
            }
            // Every token is compared, so the time taken says nothing
            // about which one came close.
            let found = opts.tokens.iter().fold(None, |hit, t| {
                match same(g.as_bytes(), t.token.as_bytes()) {
                    true => Some(t),
                    false => hit,
                }
            });
            if let Some(t) = found {
                return Ok(Caller {
                    who: format!("token `{}`", t.name),
                    grant: t.grant.clone(),
                    bearer: from_header,
                    origin: format!("http:{}", t.name),
                });
            }
            "the token given does not match this box's; use the value of --http-token (or the first line of --http-token-file) on the box, or of one of its [[http_tokens]]"
        }
        None => "a token is required: send Authorization: Bearer TOKEN or ?token=TOKEN",
    };
    Err((
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({ "error": why, "kind": "unauthorized" })),
    )
        .into_response())
}

/// What a route does. `None`: no such route (or one nobody classed).
pub fn verb_of(method: &Method, path: &str) -> Option<Verb> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segs.as_slice()) {
        (
            "GET" | "HEAD",
            [""]
            | ["api", "status" | "devices" | "commands" | "workflows" | "rollouts" | "alerts" | "history"
            | "events"]
            | ["api", "commands", _],
        ) => Some(Verb::Read),
        ("POST", ["api", "commands"]) => Some(Verb::Send),
        ("POST", ["api", "commands", _, "cancel"]) => Some(Verb::Cancel),
        ("POST", ["api", "commands", _, "retry"]) => Some(Verb::Retry),
        _ => None,
    }
}

/// A refusal by role: 403, the `Denied` text, `kind` for programs.
pub fn denied(d: &Denied) -> Response {
    (
        StatusCode::FORBIDDEN,
        Json(json!({"error": d.to_string(), "kind": "denied"})),
    )
        .into_response()
}

/// Whether `caller` may make this request at all (its role; targets are
/// checked where the handler knows them).
#[allow(clippy::result_large_err)]
pub(super) fn admit(
    caller: &Caller,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(), Response> {
    let Some(verb) = verb_of(method, path) else {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!("no route {method} {path}; see the README's HTTP API"),
        ));
    };
    caller
        .grant
        .check(&caller.who, verb, None)
        .map_err(|d| denied(&d))?;
    // A form on another site cannot set this header (nor a bearer token),
    // so a cross-site POST from a browser on the box's network is refused.
    if verb != Verb::Read && !caller.bearer && headers.get("x-outpost").is_none() {
        return Err(err(
            StatusCode::FORBIDDEN,
            "missing the X-Outpost header (or Authorization: Bearer TOKEN)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_maps_to_its_verb() {
        let get = Method::GET;
        let post = Method::POST;
        for p in [
            "/",
            "/api/status",
            "/api/devices",
            "/api/commands",
            "/api/commands/01J9ZQ3M8E5V6X7Y8Z9A0B1C2D",
            "/api/workflows",
            "/api/rollouts",
            "/api/alerts",
            "/api/history",
            "/api/events",
        ] {
            assert_eq!(verb_of(&get, p), Some(Verb::Read), "{p}");
            assert_eq!(
                verb_of(&post, p).filter(|_| p != "/api/commands"),
                None,
                "{p}"
            );
        }
        assert_eq!(verb_of(&Method::HEAD, "/"), Some(Verb::Read));
        assert_eq!(verb_of(&post, "/api/commands"), Some(Verb::Send));
        assert_eq!(verb_of(&post, "/api/commands/X/cancel"), Some(Verb::Cancel));
        assert_eq!(verb_of(&post, "/api/commands/X/retry"), Some(Verb::Retry));
        assert_eq!(verb_of(&post, "/api/commands/X/delete"), None);
        assert_eq!(verb_of(&get, "/api/commands/X/cancel"), None);
        assert_eq!(verb_of(&Method::DELETE, "/api/commands/X"), None);
    }

    fn entry(token: &str, role: &str) -> TokenEntry {
        TokenEntry {
            name: None,
            token: Some(token.into()),
            token_file: None,
            role: role.into(),
            targets: vec![],
        }
    }

    #[test]
    fn tokens_are_checked_and_read_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("mes.token");
        std::fs::write(&f, "mes-0123456789abcdef\nignored\n").unwrap();
        let ts = resolve_tokens(
            &[
                entry("viewer-0123456789abcdef", "viewer"),
                TokenEntry {
                    name: Some("mes".into()),
                    token: None,
                    token_file: Some(f),
                    role: "operator".into(),
                    targets: vec!["tag:line-3".into()],
                },
            ],
            None,
        )
        .unwrap();
        assert_eq!(ts[0].name, "http_tokens[1]");
        assert_eq!(ts[1].token, "mes-0123456789abcdef");
        assert_eq!(ts[1].grant.role, Role::Operator);
        assert!(!format!("{ts:?}").contains("0123456789"), "never printed");
        let e = |es: &[TokenEntry], l: Option<&str>| resolve_tokens(es, l).unwrap_err();
        assert_eq!(
            e(&[entry("short", "viewer")], None),
            TokenError::Short { n: 1 }
        );
        assert!(matches!(
            e(
                &[entry("same-0123456789abcdef", "viewer")],
                Some("same-0123456789abcdef")
            ),
            TokenError::Twice { n: 1, .. }
        ));
        assert!(matches!(
            e(
                &[
                    entry("same-0123456789abcdef", "viewer"),
                    entry("same-0123456789abcdef", "admin")
                ],
                None
            ),
            TokenError::Twice { n: 2, .. }
        ));
        let m = e(&[entry("role-0123456789abcdef", "root")], None).to_string();
        assert!(m.contains("unknown role `root`"), "{m}");
    }
}
