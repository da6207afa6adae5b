//! The layering, checked on the sources: the sans-IO engine imports no IO,
//! no clock and no shell, and nothing below the CLI imports the CLI. A
//! scan of the text (each file's code before its `mod tests`, comments
//! left out), so it runs in milliseconds and names the line that broke it.

use std::path::{Path, PathBuf};

/// The engine is a folder: every file under it is scanned, a new one
/// too (each up to its inline `mod tests`; a test file of its own, as the
/// core's, whole: the engine's tests need no world either).
const ENGINE: &str = "src/engine";

/// What an engine file may not name: IO, the clock, async runtimes, and
/// the layers above it.
const NOT_IN_THE_ENGINE: &[&str] = &[
    "tokio",
    "sled",
    "quinn",
    "rustls",
    "axum",
    "async_nats",
    "std::fs",
    "std::net::UdpSocket",
    "std::net::TcpStream",
    "std::process",
    "SystemTime",
    "Instant::now",
    "now_millis()",
    "tempfile",
    "QueueHandle",
    "crate::shell",
    "crate::device",
    "crate::identity",
    // The frames are the engine's; `proto` is their IO on a stream.
    "crate::proto",
    "crate::cli",
    "crate::sim",
    "crate::bench",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file's code lines (number, text): before its unit tests, without
/// comment lines.
fn code(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

/// Whether `line` names `path` as a whole path segment (`crate::cli` is
/// not named by `crate::device`).
fn names(line: &str, path: &str) -> bool {
    line.match_indices(path).any(|(i, _)| {
        let next = line[i + path.len()..].chars().next();
        !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `.rs` file under `dir` (relative to the crate), relative to the
/// crate, sorted.
fn files_under(dir: &str) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&root().join(dir), &mut files);
    let mut rel: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    rel.sort();
    rel
}

#[test]
fn the_engine_imports_no_io_no_clock_and_no_shell() {
    let files = files_under(ENGINE);
    // The rules of the queue, the sync, workflows, rollouts and trust are
    // all in it (a folder emptied by a move would pass the scan).
    for must in [
        "src/engine/queue/core.rs",
        "src/engine/queue/outbox.rs",
        "src/engine/cursor.rs",
        "src/engine/workflow/run.rs",
        "src/engine/uplink.rs",
        "src/engine/rollout/mod.rs",
        "src/engine/trust/set.rs",
        "src/engine/route.rs",
        "src/engine/alert.rs",
    ] {
        assert!(files.iter().any(|f| f == must), "{must} not in {files:?}");
    }
    let mut broken = reaching_out(&files);
    // Of the crate, the engine names only itself (and the vocabulary the
    // crate's root re-exports from it): no module beside it, so it is the
    // bottom of the import graph.
    for f in &files {
        for (n, line) in code(&root().join(f)) {
            for (i, _) in line.match_indices("crate::") {
                let next = &line[i + "crate::".len()..];
                let lower = next.chars().next().is_some_and(|c| c.is_ascii_lowercase());
                if lower && !next.starts_with("engine::") {
                    broken.push(format!(
                        "{f}:{n}: names a module beside the engine: {}",
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "the engine reaches out:\n{}",
        broken.join("\n")
    );
}

/// The lines of `files` (relative to the crate) that name what the engine
/// may not.
fn reaching_out(files: &[String]) -> Vec<String> {
    let mut broken = Vec::new();
    for f in files {
        for (n, line) in code(&root().join(f)) {
            for bad in NOT_IN_THE_ENGINE {
                if names(&line, bad) {
                    broken.push(format!("{f}:{n}: `{bad}` in: {}", line.trim()));
                }
            }
        }
    }
    broken
}

/// The simulation runs the real code: the engine, and nothing of a shell
/// (a round, a restart, a forward or a job's step written again in a
/// shell would be code the simulation does not test).
#[test]
fn the_simulation_runs_the_engine_alone() {
    let rel = files_under("src/sim");
    assert!(rel.len() >= 5, "{rel:?}");
    let broken = reaching_out(&rel);
    assert!(
        broken.is_empty(),
        "the simulation reaches past the engine:\n{}",
        broken.join("\n")
    );
}

#[test]
fn nothing_below_the_cli_imports_it() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let cli = root().join("src/cli");
    let main = root().join("src/main.rs");
    let mut broken = Vec::new();
    let mut scanned = 0;
    for f in files.iter().filter(|f| !f.starts_with(&cli) && **f != main) {
        scanned += 1;
        for (n, line) in code(f) {
            if names(&line, "crate::cli") {
                broken.push(format!("{}:{n}: {}", f.display(), line.trim()));
            }
        }
    }
    assert!(scanned > 30, "only {scanned} files scanned");
    assert!(
        broken.is_empty(),
        "a lower layer imports the CLI:\n{}",
        broken.join("\n")
    );
}

/// The device library (and the trust code it verifies with) stays small
/// enough to embed: no store, no box shells, no web or CLI crates.
#[test]
fn the_device_side_names_no_store_and_no_shell_of_the_box() {
    let mut files = vec![root().join("src/device.rs")];
    rust_files(&root().join("src/device"), &mut files);
    rust_files(&root().join("src/engine/trust"), &mut files);
    let forbidden = [
        "sled",
        "axum",
        "clap",
        // No shell of the box: the close codes, say, are the wire's
        // (`proto::close_code`), not the link server's.
        "crate::shell",
        "crate::engine::queue",
        "crate::cli",
    ];
    let mut broken = Vec::new();
    for f in &files {
        for (n, line) in code(f) {
            for bad in forbidden {
                if names(&line, bad) {
                    broken.push(format!("{}:{n}: `{bad}` in: {}", f.display(), line.trim()));
                }
            }
        }
    }
    assert!(files.len() >= 7, "{files:?}");
    assert!(
        broken.is_empty(),
        "the device side reaches into the box:\n{}",
        broken.join("\n")
    );
}

/// Issue 22: the device library is the crate without its `box` feature,
/// and what it pulls in has none of the box's big dependencies (`.ci/run`
/// builds it so, with `examples/device.rs`). `cargo tree` reads only the
/// lockfile and the manifests, offline.
#[test]
fn the_device_library_builds_without_the_boxs_dependencies() {
    let tree = |features: &[&str]| {
        let out = std::process::Command::new(env!("CARGO"))
            .current_dir(root())
            .args([
                "tree",
                "--offline",
                "--locked",
                "-e",
                "normal",
                "--prefix",
                "none",
            ])
            .args(features)
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "cargo tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let mut crates: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        crates.sort();
        crates.dedup();
        crates
    };
    let device = tree(&["--no-default-features"]);
    let full = tree(&[]);
    let the_box = [
        "sled",
        "axum",
        "async-nats",
        "clap",
        "hyper",
        "tracing-subscriber",
        "toml",
        "age",
    ];
    for name in the_box {
        assert!(
            full.iter().any(|c| c == name),
            "the box has {name}: {full:?}"
        );
        assert!(
            !device.iter().any(|c| c == name),
            "the device library pulls in {name}"
        );
    }
    for name in ["quinn", "rustls", "tokio", "postcard"] {
        assert!(device.iter().any(|c| c == name), "{name}: {device:?}");
    }
}

#[test]
fn the_scan_sees_what_it_forbids() {
    // The check itself: a forbidden name on a code line is found, one in a
    // comment or in the unit tests is not.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.rs");
    std::fs::write(
        &f,
        "// tokio in a comment\nuse tokio::sync;\n#[cfg(test)]\nmod tests {\n    use sled;\n}\n",
    )
    .unwrap();
    let hits: Vec<usize> = code(&f)
        .into_iter()
        .filter(|(_, l)| NOT_IN_THE_ENGINE.iter().any(|b| names(l, b)))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(hits, vec![2]);
    assert!(names("use crate::cli::x;", "crate::cli"));
    assert!(!names("use crate::device::x;", "crate::cli"));
}

/// Issue 22: one concept per file, and a file past about 1,000 lines
/// says at its top why it is one file (its first lines hold a "Why").
#[test]
fn a_long_file_says_why_at_its_top() {
    const ABOUT_A_THOUSAND: usize = 1_100;
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut silent = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines = text.lines().count();
        let top: Vec<&str> = text.lines().take(20).collect();
        if lines > ABOUT_A_THOUSAND && !top.iter().any(|l| l.starts_with("//! Why")) {
            silent.push(format!("{} ({lines} lines)", f.display()));
        }
    }
    assert!(
        silent.is_empty(),
        "long files that do not say why at their top (split them, or write a `//! Why …` paragraph):\n{}",
        silent.join("\n")
    );
}
