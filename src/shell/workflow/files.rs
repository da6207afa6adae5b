//! The workflow files on the sender's disk: the one place the workflow
//! engine touches the file system, so the engine (`engine/workflow.rs`) stays
//! pure and the simulation can run it.

use crate::engine::workflow::{Packed, Payload, Workflow, WorkflowError};
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

#[cfg(test)]
mod tests {
    use super::*;

    const FLASH: &str = r#"name = "flash"
[steps.stop]
target = "plc-1"
payload = "stop"
[steps.flash]
target = "tag:camera"
payload_file = "fw/image.bin"
needs = ["stop"]
"#;

    fn dir_with(
        workflow: &str,
        firmware: Option<&[u8]>,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flash.toml");
        std::fs::write(&path, workflow).unwrap();
        if let Some(b) = firmware {
            std::fs::create_dir(dir.path().join("fw")).unwrap();
            std::fs::write(dir.path().join("fw/image.bin"), b).unwrap();
        }
        (dir, path)
    }

    #[test]
    fn a_packed_workflow_carries_its_payload_files_and_unpacks_them_inline() {
        let (_dir, path) = dir_with(FLASH, Some(b"\x7fELF firmware"));
        let packed = Packed::read(&path).unwrap();
        assert_eq!(packed.text, FLASH);
        assert_eq!(
            packed.payloads,
            vec![("fw/image.bin".to_string(), b"\x7fELF firmware".to_vec())]
        );
        // Through the bytes a command carries, to the box that runs it.
        let back = Packed::from_bytes(&packed.to_bytes()).unwrap();
        let w = back.unpack().unwrap();
        let flash = w.steps.iter().find(|s| s.name == "flash").unwrap();
        assert_eq!(flash.payload, Payload::Inline(b"\x7fELF firmware".to_vec()));
    }

    #[test]
    fn a_missing_workflow_or_payload_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nope.toml");
        for e in [
            Packed::read(&gone).unwrap_err(),
            Workflow::load(&gone).unwrap_err(),
        ] {
            assert_eq!(e.file, gone.display().to_string());
            assert!(e.message.starts_with("cannot read it: "), "{}", e.message);
        }
        let (dir, path) = dir_with(FLASH, None);
        let e = Packed::read(&path).unwrap_err();
        let want = dir.path().join("fw/image.bin");
        assert!(
            e.message
                .contains("step `flash`: cannot read its payload_file")
                && e.message.contains(&want.display().to_string()),
            "{}",
            e.message
        );
        // A file that is not a workflow is refused as such, not as unreadable.
        let (_d, bad) = dir_with("name = 3", None);
        let e = Packed::read(&bad).unwrap_err();
        assert!(!e.message.starts_with("cannot read it"), "{}", e.message);
    }

    #[test]
    fn loading_resolves_a_relative_payload_file_against_the_workflow_dir() {
        let (dir, path) = dir_with(FLASH, Some(b"x"));
        let w = Workflow::load(&path).unwrap();
        let flash = w.steps.iter().find(|s| s.name == "flash").unwrap();
        assert_eq!(
            flash.payload,
            Payload::File(dir.path().join("fw/image.bin"))
        );
        // An absolute one is kept as written.
        let abs = dir.path().join("fw/image.bin");
        let text = FLASH.replace("fw/image.bin", &abs.display().to_string());
        let (_d2, p2) = dir_with(&text, None);
        let w = Workflow::load(&p2).unwrap();
        let flash = w.steps.iter().find(|s| s.name == "flash").unwrap();
        assert_eq!(flash.payload, Payload::File(abs));
    }
}
