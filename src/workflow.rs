//! Workflows (issue 14): named steps, each a command, ordered by `needs`,
//! gated by `when` conditions on earlier steps, with compensation steps
//! (`on_failure`) and a timeout. This module reads and checks the TOML file:
//! every mistake is a clear error naming the step and its line, found
//! before anything runs.
//!
//! ```toml
//! name = "reflash-line-3"
//! timeout = "30m"
//! on_failure = ["resume"]           # run only if the workflow fails
//! [steps.stop]
//! target = "plc-1"
//! payload = "stop"
//! [steps.flash]
//! target = "tag:camera"
//! payload_file = "fw.bin"
//! needs = ["stop"]
//! min_success = "100%"
//! [steps.restart]
//! target = "plc-1"
//! payload = "start"
//! needs = ["flash"]
//! when = { step = "flash", state = "succeeded", result_contains = "ok" }
//! [steps.resume]
//! target = "plc-1"
//! payload = "start-previous-firmware"
//! ```

use crate::command::Priority;
use crate::route::Target;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// Why a workflow file is refused. The message names the step and the line.
#[derive(Debug, PartialEq, Eq)]
pub struct WorkflowError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file, self.message),
            n => write!(f, "{}:{n}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for WorkflowError {}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    name: Spanned<String>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    on_failure: Vec<Spanned<String>>,
    steps: BTreeMap<Spanned<String>, Spanned<StepSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepSpec {
    target: Spanned<String>,
    payload: Option<String>,
    payload_file: Option<Spanned<String>>,
    priority: Option<Spanned<String>>,
    ttl: Option<Spanned<String>>,
    max_attempts: Option<u32>,
    #[serde(default)]
    needs: Vec<Spanned<String>>,
    when: Option<Spanned<WhenSpec>>,
    min_success: Option<Spanned<Quorum>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Quorum {
    Count(u32),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhenSpec {
    step: String,
    state: Option<String>,
    result_equals: Option<String>,
    result_contains: Option<String>,
    result_regex: Option<String>,
    json_pointer: Option<String>,
    equals: Option<toml::Value>,
}

/// A checked workflow, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Workflow {
    pub name: String,
    pub timeout: Option<Duration>,
    /// Steps in an order that respects `needs` (ties by name).
    pub steps: Vec<Step>,
    /// Compensation steps, run (in this order, honouring their own
    /// `needs`) only if the workflow fails.
    pub on_failure: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    pub target: String,
    pub payload: Payload,
    pub priority: Priority,
    pub ttl: Option<Duration>,
    pub max_attempts: Option<u32>,
    pub needs: Vec<String>,
    pub when: Option<Condition>,
    /// For a `tag:`/`cap:` step: how many of its children must succeed.
    pub min_success: Option<MinSuccess>,
    /// The line of its `[steps.NAME]` table.
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    Inline(Vec<u8>),
    /// Read when the workflow is started (relative to the file's dir).
    File(std::path::PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinSuccess {
    Percent(u32),
    Count(u32),
}

/// `when`: run the step only if an earlier step ended so.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub step: String,
    pub state: StateMatch,
    pub result: Option<ResultMatch>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateMatch {
    Succeeded,
    Failed,
    /// Any end state.
    Any,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ResultMatch {
    Equals(String),
    Contains(String),
    Regex(String),
    /// A JSON pointer into the result, compared to a value.
    Json {
        pointer: String,
        equals: serde_json::Value,
    },
}

/// Line (1-based) of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

impl Workflow {
    /// Read and check a workflow file.
    pub fn load(path: &Path) -> Result<Workflow, WorkflowError> {
        let text = std::fs::read_to_string(path).map_err(|e| WorkflowError {
            file: path.display().to_string(),
            line: 0,
            message: format!("cannot read it: {e}"),
        })?;
        let mut w = Workflow::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        for s in &mut w.steps {
            if let Payload::File(f) = &mut s.payload {
                if f.is_relative() {
                    *f = base.join(&*f);
                }
            }
        }
        Ok(w)
    }

    /// Parse and check workflow text (`file` names it in errors).
    pub fn parse(text: &str, file: &str) -> Result<Workflow, WorkflowError> {
        let err = |line: usize, message: String| WorkflowError {
            file: file.to_string(),
            line,
            message,
        };
        let spec: FileSpec = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            err(line, format!("not a valid workflow: {}", e.message()))
        })?;
        let at = |s: std::ops::Range<usize>| line_of(text, s.start);
        if spec.name.get_ref().trim().is_empty() {
            return Err(err(
                at(spec.name.span()),
                "the workflow needs a name".into(),
            ));
        }
        if spec.steps.is_empty() {
            return Err(err(
                1,
                "the workflow has no steps; add [steps.NAME] tables".into(),
            ));
        }
        let timeout = match &spec.timeout {
            None => None,
            Some(t) => Some(humantime::parse_duration(t.get_ref()).map_err(|e| {
                err(
                    at(t.span()),
                    format!("timeout {:?}: {e} (write e.g. 30m)", t.get_ref()),
                )
            })?),
        };
        let names: BTreeSet<&str> = spec.steps.keys().map(|k| k.get_ref().as_str()).collect();
        let comp: BTreeSet<&str> = spec
            .on_failure
            .iter()
            .map(|s| s.get_ref().as_str())
            .collect();
        for s in &spec.on_failure {
            if !names.contains(s.get_ref().as_str()) {
                return Err(err(
                    at(s.span()),
                    format!("on_failure names `{}`, which is not a step", s.get_ref()),
                ));
            }
        }
        let mut steps = Vec::new();
        for (k, v) in &spec.steps {
            let name = k.get_ref().clone();
            let line = at(k.span());
            let step_err = |line: usize, m: String| err(line, format!("step `{name}`: {m}"));
            let s = v.get_ref();
            crate::route::check_name(&name, "step name")
                .map_err(|e| step_err(line, e.to_string()))?;
            let target = s.target.get_ref();
            let parsed = Target::parse(target).map_err(|e| {
                step_err(
                    at(s.target.span()),
                    format!("{e}; a target is dev-7, tag:NAME, cap:NAME or EDGE/…"),
                )
            })?;
            let payload = match (&s.payload, &s.payload_file) {
                (Some(p), None) => Payload::Inline(p.clone().into_bytes()),
                (None, Some(f)) => Payload::File(f.get_ref().into()),
                (Some(_), Some(f)) => {
                    return Err(step_err(
                        at(f.span()),
                        "give payload or payload_file, not both".into(),
                    ))
                }
                (None, None) => {
                    return Err(step_err(
                        line,
                        "it needs a payload or a payload_file".into(),
                    ))
                }
            };
            let priority = match &s.priority {
                None => Priority::Normal,
                Some(p) => p.get_ref().parse().map_err(|_| {
                    step_err(
                        at(p.span()),
                        format!("priority {:?}: use high, normal or low", p.get_ref()),
                    )
                })?,
            };
            let ttl =
                match &s.ttl {
                    None => None,
                    Some(t) => Some(humantime::parse_duration(t.get_ref()).map_err(|e| {
                        step_err(at(t.span()), format!("ttl {:?}: {e}", t.get_ref()))
                    })?),
                };
            let mut needs = Vec::new();
            for n in &s.needs {
                let n_name = n.get_ref();
                if !names.contains(n_name.as_str()) {
                    return Err(step_err(
                        at(n.span()),
                        format!("it needs `{n_name}`, which is not a step"),
                    ));
                }
                if n_name == &name {
                    return Err(step_err(at(n.span()), "it needs itself".into()));
                }
                if comp.contains(n_name.as_str()) && !comp.contains(name.as_str()) {
                    return Err(step_err(
                        at(n.span()),
                        format!("it needs `{n_name}`, which runs only on failure (on_failure)"),
                    ));
                }
                needs.push(n_name.clone());
            }
            let min_success = match &s.min_success {
                None => None,
                Some(q) => {
                    if !matches!(parsed, Target::Tag(_) | Target::Cap(_))
                        && !matches!(parsed, Target::Edge { rest, .. } if rest.starts_with("tag:") || rest.starts_with("cap:"))
                    {
                        return Err(step_err(
                            at(q.span()),
                            "min_success applies to a tag: or cap: target".into(),
                        ));
                    }
                    Some(match q.get_ref() {
                        Quorum::Count(n) => MinSuccess::Count(*n),
                        Quorum::Text(t) => match t.strip_suffix('%').map(|p| p.trim().parse::<u32>()) {
                            Some(Ok(p)) if p <= 100 => MinSuccess::Percent(p),
                            _ => {
                                return Err(step_err(
                                    at(q.span()),
                                    format!("min_success {t:?}: write a count (3) or a percentage (\"90%\")"),
                                ))
                            }
                        },
                    })
                }
            };
            let when = match &s.when {
                None => None,
                Some(w) => Some(condition(w.get_ref()).map_err(|m| step_err(at(w.span()), m))?),
            };
            steps.push((
                Step {
                    name: name.clone(),
                    target: target.clone(),
                    payload,
                    priority,
                    ttl,
                    max_attempts: s.max_attempts,
                    needs,
                    when,
                    min_success,
                    line,
                },
                s.when.as_ref().map(|w| at(w.span())),
            ));
        }
        let order =
            topo_order(&steps.iter().map(|(s, _)| s).collect::<Vec<_>>()).map_err(|cycle| {
                let first = steps
                    .iter()
                    .find(|(s, _)| s.name == cycle[0])
                    .map_or(0, |(s, _)| s.line);
                err(
                    first,
                    format!(
                        "steps {} form a cycle; remove one of the needs",
                        cycle.join(" → ")
                    ),
                )
            })?;
        // A condition may only look at a step that has ended by then: one
        // upstream of it.
        for (s, when_line) in &steps {
            if let Some(c) = &s.when {
                if !upstream(&steps.iter().map(|(s, _)| s).collect::<Vec<_>>(), &s.name)
                    .contains(&c.step)
                {
                    let known = names.contains(c.step.as_str());
                    return Err(err(
                        when_line.unwrap_or(s.line),
                        if known {
                            format!("step `{}`: its condition is on `{}`, which is not upstream of it; add `{}` to its needs", s.name, c.step, c.step)
                        } else {
                            format!(
                                "step `{}`: its condition is on `{}`, which is not a step",
                                s.name, c.step
                            )
                        },
                    ));
                }
            }
        }
        let mut by_name: BTreeMap<String, Step> = steps
            .into_iter()
            .map(|(s, _)| (s.name.clone(), s))
            .collect();
        Ok(Workflow {
            name: spec.name.into_inner(),
            timeout,
            steps: order
                .into_iter()
                .filter_map(|n| by_name.remove(&n))
                .collect(),
            on_failure: spec
                .on_failure
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
        })
    }
}

fn condition(w: &WhenSpec) -> Result<Condition, String> {
    let state = match w.state.as_deref() {
        None | Some("succeeded") => StateMatch::Succeeded,
        Some("failed") => StateMatch::Failed,
        Some("any") | Some("ended") => StateMatch::Any,
        Some(other) => {
            return Err(format!(
                "when.state {other:?}: use succeeded, failed or any"
            ))
        }
    };
    let mut results = Vec::new();
    if let Some(v) = &w.result_equals {
        results.push(ResultMatch::Equals(v.clone()));
    }
    if let Some(v) = &w.result_contains {
        results.push(ResultMatch::Contains(v.clone()));
    }
    if let Some(v) = &w.result_regex {
        regex_lite::Regex::new(v).map_err(|e| format!("when.result_regex {v:?}: {e}"))?;
        results.push(ResultMatch::Regex(v.clone()));
    }
    match (&w.json_pointer, &w.equals) {
        (Some(p), Some(v)) => {
            if !(p.is_empty() || p.starts_with('/')) {
                return Err(format!(
                    "when.json_pointer {p:?}: a JSON pointer starts with / (e.g. /status)"
                ));
            }
            let equals = serde_json::to_value(v).map_err(|e| e.to_string())?;
            results.push(ResultMatch::Json {
                pointer: p.clone(),
                equals,
            });
        }
        (None, None) => {}
        _ => return Err("when.json_pointer and when.equals go together".into()),
    }
    if results.len() > 1 {
        return Err("give one result condition (result_equals, result_contains, result_regex or json_pointer + equals)".into());
    }
    Ok(Condition {
        step: w.step.clone(),
        state,
        result: results.pop(),
    })
}

/// An order in which every step comes after what it needs (ties by name),
/// or the steps of a cycle.
fn topo_order(steps: &[&Step]) -> Result<Vec<String>, Vec<String>> {
    let needs: BTreeMap<&str, &[String]> = steps
        .iter()
        .map(|s| (s.name.as_str(), s.needs.as_slice()))
        .collect();
    let mut done: Vec<String> = Vec::new();
    let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 visiting, 2 done
    fn visit<'a>(
        n: &'a str,
        needs: &BTreeMap<&'a str, &'a [String]>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
        done: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        match state.get(n) {
            Some(2) => return Ok(()),
            Some(1) => {
                let from = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[from..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_string());
                return Err(cycle);
            }
            _ => {}
        }
        state.insert(n, 1);
        path.push(n);
        for m in needs.get(n).copied().unwrap_or(&[]) {
            visit(m, needs, state, path, done)?;
        }
        path.pop();
        state.insert(n, 2);
        done.push(n.to_string());
        Ok(())
    }
    for s in steps {
        visit(&s.name, &needs, &mut state, &mut Vec::new(), &mut done)?;
    }
    Ok(done)
}

/// Every step `name` needs, directly or not.
fn upstream(steps: &[&Step], name: &str) -> BTreeSet<String> {
    let needs: BTreeMap<&str, &[String]> = steps
        .iter()
        .map(|s| (s.name.as_str(), s.needs.as_slice()))
        .collect();
    let mut out = BTreeSet::new();
    let mut todo: Vec<&str> = needs
        .get(name)
        .map(|n| n.iter().map(String::as_str).collect())
        .unwrap_or_default();
    while let Some(n) = todo.pop() {
        if out.insert(n.to_string()) {
            todo.extend(
                needs
                    .get(n)
                    .into_iter()
                    .flat_map(|v| v.iter().map(String::as_str)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFLASH: &str = r#"name = "reflash-line-3"
timeout = "30m"
on_failure = ["resume"]           # run only if the workflow fails
[steps.stop]
target = "plc-1"
payload = "stop"
[steps.flash]
target = "tag:camera"
payload_file = "fw.bin"
needs = ["stop"]
min_success = "100%"
[steps.verify]
target = "tag:camera"
payload = "verify"
needs = ["flash"]
[steps.restart]
target = "plc-1"
payload = "start"
needs = ["verify"]
when = { step = "verify", state = "succeeded", result_contains = "ok" }
[steps.resume]
target = "plc-1"
payload = "start-previous-firmware"
"#;

    #[test]
    fn the_contract_example_parses_in_dependency_order() {
        let w = Workflow::parse(REFLASH, "reflash.toml").unwrap();
        assert_eq!(w.name, "reflash-line-3");
        assert_eq!(w.timeout, Some(Duration::from_secs(1800)));
        let order: Vec<&str> = w.steps.iter().map(|s| s.name.as_str()).collect();
        let pos = |n| order.iter().position(|x| *x == n).unwrap();
        assert!(
            pos("stop") < pos("flash")
                && pos("flash") < pos("verify")
                && pos("verify") < pos("restart")
        );
        assert_eq!(w.on_failure, vec!["resume"]);
        let flash = &w.steps[pos("flash")];
        assert_eq!(flash.min_success, Some(MinSuccess::Percent(100)));
        assert_eq!(flash.payload, Payload::File("fw.bin".into()));
        assert_eq!(flash.line, 7);
        let restart = &w.steps[pos("restart")];
        assert_eq!(
            restart.when,
            Some(Condition {
                step: "verify".into(),
                state: StateMatch::Succeeded,
                result: Some(ResultMatch::Contains("ok".into())),
            })
        );
    }

    fn fails(text: &str) -> WorkflowError {
        Workflow::parse(text, "w.toml").unwrap_err()
    }

    #[test]
    fn each_mistake_names_the_step_and_its_line() {
        let e = fails("name = \"x\"\n[steps.a]\ntarget = \"d\"\npayload = \"p\"\nneeds = [\"b\"]\n[steps.b]\ntarget = \"d\"\npayload = \"p\"\nneeds = [\"a\"]\n");
        assert!(
            e.message.contains("cycle") && e.message.contains("a → b → a"),
            "{e}"
        );
        assert_eq!(e.line, 2);

        let e =
            fails("name = \"x\"\n[steps.a]\ntarget = \"d\"\npayload = \"p\"\nneeds = [\"nope\"]\n");
        assert_eq!(
            (
                e.line,
                e.to_string()
                    .contains("step `a`: it needs `nope`, which is not a step")
            ),
            (5, true),
            "{e}"
        );

        let e = fails("name = \"x\"\n[steps.a]\ntarget = \"tag:\"\npayload = \"p\"\n");
        assert!(
            e.message.contains("step `a`") && e.message.contains("tag"),
            "{e}"
        );
        assert_eq!(e.line, 3);

        let e = fails("name = \"x\"\n[steps.a]\ntarget = \"d\"\npayload = \"p\"\n[steps.b]\ntarget = \"d\"\npayload = \"p\"\nwhen = { step = \"a\" }\n");
        assert!(
            e.message.contains("not upstream of it") && e.message.contains("add `a` to its needs"),
            "{e}"
        );
        assert_eq!(e.line, 8);

        let e = fails("name = \"x\"\n[steps.a]\ntarget = \"d\"\n");
        assert!(e.message.contains("payload"), "{e}");

        let e = fails(
            "name = \"x\"\non_failure = [\"z\"]\n[steps.a]\ntarget = \"d\"\npayload = \"p\"\n",
        );
        assert!(
            e.message.contains("on_failure names `z`") && e.line == 2,
            "{e}"
        );

        let e = fails(
            "name = \"x\"\n[steps.a]\ntarget = \"d\"\npayload = \"p\"\nmin_success = \"90%\"\n",
        );
        assert!(e.message.contains("tag: or cap:"), "{e}");

        let e = fails("name = \"x\"\n[steps.a]\ntarget = \"d\"\npayload = \"p\"\nretries = 3\n");
        assert!(
            e.message.contains("retries"),
            "an unknown key is named: {e}"
        );
        assert_eq!(e.line, 5);

        let e = fails("name = \"x\"\n[steps.a]\ntarget = \"d\"\npayload = \"p\"\n[steps.b]\ntarget = \"d\"\npayload = \"p\"\nneeds = [\"a\"]\nwhen = { step = \"a\", result_regex = \"(\" }\n");
        assert!(e.message.contains("result_regex"), "{e}");
    }
}
