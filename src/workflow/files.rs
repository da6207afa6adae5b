//! The workflow files on the sender's disk: the one place the workflow
//! engine touches the file system, so the engine (`workflow/mod.rs`) stays
//! pure and the simulation can run it.

use super::{Packed, Payload, Workflow, WorkflowError};
use std::path::Path;

impl Packed {
    /// Read a workflow file and the payload files it names (relative to
    /// its directory); checked, so a bad file fails here, on the sender.
    pub fn read(path: &Path) -> Result<Packed, WorkflowError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| WorkflowError {
            file: file.clone(),
            line: 0,
            message: format!("cannot read it: {e}"),
        })?;
        let raw = Workflow::parse(&text, &file)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut payloads = Vec::new();
        for s in &raw.steps {
            if let Payload::File(f) = &s.payload {
                let p = base.join(f);
                let bytes = std::fs::read(&p).map_err(|e| WorkflowError {
                    file: file.clone(),
                    line: 0,
                    message: format!(
                        "step `{}`: cannot read its payload_file {}: {e}",
                        s.name,
                        p.display()
                    ),
                })?;
                payloads.push((f.display().to_string(), bytes));
            }
        }
        Ok(Packed {
            file,
            text,
            payloads,
        })
    }
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
}
