//! `outpost workflow …`: check, run, show, list, cancel.

use super::*;

/// `outpost workflow …`.
#[derive(Debug, clap::Subcommand)]
pub enum WorkflowCmd {
    /// Check a workflow file: a cycle, an unknown step, a bad target, a
    /// condition on a step that is not upstream — each named with its line
    /// (exit 2). Prints the order the steps run in.
    Check {
        /// The workflow file (TOML).
        file: PathBuf,
        /// Print the order and any errors as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a workflow on the box (payload files are read here and sent
    /// along). Prints its id.
    Run {
        /// The workflow file (TOML).
        file: PathBuf,
        /// Wait for the end (default 10m); exit 0 only if it succeeded.
        /// TIMEOUT: 90s, 10m, 1h, or a number of seconds.
        #[arg(long, num_args = 0..=1, default_missing_value = "10m", value_name = "TIMEOUT", allow_negative_numbers = true)]
        wait: Option<crate::engine::duration::DurationArg>,
        /// Print the id (or with `--wait`, the run) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A run's steps with their states and results.
    Show {
        /// The run's id (as `workflow run` printed it).
        id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every run the box keeps, newest first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a run: running steps are cancelled, waiting ones never start.
    Cancel {
        /// The run's id.
        id: String,
        /// Run its on_failure steps.
        #[arg(long)]
        compensate: bool,
    },
}

pub(super) fn workflow_json(v: &crate::shell::workflow::RunView) -> Value {
    v.json()
}

pub(super) fn print_workflow(v: &crate::shell::workflow::RunView) {
    crate::outln!("{} {} — {}", v.id, v.name, v.state);
    let rows: Vec<Vec<String>> = v
        .steps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.state.clone(),
                s.target.clone(),
                result_cell(s.result.as_deref()),
            ]
        })
        .collect();
    print_table(&["STEP", "STATE", "TARGET", "RESULT"], &rows);
}

pub(super) async fn workflow_cmd(cmd: WorkflowCmd, data_dir: &Path) -> anyhow::Result<i32> {
    let shown = |r: AdminResponse| -> anyhow::Result<crate::shell::workflow::RunView> {
        match r {
            AdminResponse::Workflow(v) => Ok(*v),
            other => bail!("unexpected answer from the box: {other:?}"),
        }
    };
    match cmd {
        WorkflowCmd::Check { .. } => unreachable!("handled without a box"),
        WorkflowCmd::Run { file, wait, json } => {
            let p = match crate::engine::workflow::Packed::read(&file) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(exit::USAGE);
                }
            };
            let req = AdminRequest::WorkflowRun {
                file: p.file,
                text: p.text,
                payloads: p.payloads,
            };
            let mut v = shown(call(data_dir, req).await?)?;
            if let Some(timeout) = wait {
                let deadline = std::time::Instant::now() + Duration::from(timeout);
                while v.state == "running" {
                    if std::time::Instant::now() >= deadline {
                        if json {
                            crate::outln!("{}", workflow_json(&v));
                        } else {
                            print_workflow(&v);
                        }
                        return Ok(exit::TIMED_OUT);
                    }
                    // The box runs it; this only looks now and then.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    v = shown(call(data_dir, AdminRequest::WorkflowShow(v.id)).await?)?;
                }
                if json {
                    crate::outln!("{}", workflow_json(&v));
                } else {
                    print_workflow(&v);
                }
                return Ok(if v.state == "succeeded" {
                    0
                } else {
                    exit::UNSUCCESSFUL
                });
            }
            if json {
                crate::outln!("{}", workflow_json(&v));
            } else {
                crate::outln!("{}", v.id);
            }
            Ok(0)
        }
        WorkflowCmd::Show { id, json } => {
            let v = shown(call(data_dir, AdminRequest::WorkflowShow(parse_id(&id)?)).await?)?;
            if json {
                crate::outln!("{}", workflow_json(&v));
            } else {
                print_workflow(&v);
            }
            Ok(0)
        }
        WorkflowCmd::List { json } => {
            let AdminResponse::Workflows(vs) = call(data_dir, AdminRequest::WorkflowList).await?
            else {
                bail!("unexpected answer from the box")
            };
            if json {
                crate::outln!("{}", Value::Array(vs.iter().map(workflow_json).collect()));
            } else {
                let rows: Vec<Vec<String>> = vs
                    .iter()
                    .map(|v| {
                        let done = v
                            .steps
                            .iter()
                            .filter(|s| s.state != "pending" && s.state != "running")
                            .count();
                        vec![
                            v.id.to_string(),
                            v.name.clone(),
                            v.state.clone(),
                            format!("{done}/{}", v.steps.len()),
                            ago(v.started_at),
                        ]
                    })
                    .collect();
                print_table(&["ID", "NAME", "STATE", "STEPS", "STARTED"], &rows);
            }
            Ok(0)
        }
        WorkflowCmd::Cancel { id, compensate } => {
            let req = AdminRequest::WorkflowCancel {
                id: parse_id(&id)?,
                compensate,
            };
            let v = shown(call(data_dir, req).await?)?;
            crate::outln!("{} {}", v.id, v.state);
            Ok(0)
        }
    }
}
