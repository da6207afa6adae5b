//! Black-box tests of the box's artifact store (issue 24): the real binary,
//! `outpost artifact add | list | show | rm` and `send --artifact`.
//! A file is stored once in content-defined chunks; a second version sends
//! only what changed; a removal while a live command names it is refused;
//! a command names its artifact (signed or not) and the box refuses one it
//! does not hold.

#[path = "common/run.rs"]
mod run;
use run::{json, ok, stderr, text};
#[path = "common/cli_box.rs"]
mod cli_box;
use cli_box::Box_;
use rand::{RngCore, SeedableRng};

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn chunk_files(b: &Box_) -> usize {
    let root = b.dir.path().join("chunks");
    assert!(root.is_dir(), "the chunk store is {}", root.display());
    walk(&root)
}

fn walk(p: &std::path::Path) -> usize {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The names `artifact list --json` prints (a JSON object per line).
fn names(b: &Box_) -> Vec<String> {
    ok(&b.run(&["artifact", "list", "--json"]))
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["name"].as_str().unwrap().to_string()
        })
        .collect()
}

/// `artifact add FILE --name N --version V --json`.
fn add(b: &Box_, file: &std::path::Path, name: &str, version: &str) -> serde_json::Value {
    json(&b.run(&[
        "artifact",
        "add",
        file.to_str().unwrap(),
        "--name",
        name,
        "--version",
        version,
        "--json",
    ]))
}

#[test]
fn files_are_stored_once_in_chunks_and_a_new_version_sends_only_what_changed() {
    let b = Box_::start();
    let v1 = random(4 << 20, 1);
    let mut v2 = v1.clone();
    // About 1 % of the bytes, in one place.
    let at = v1.len() / 3;
    v2[at..at + v1.len() / 100].copy_from_slice(&random(v1.len() / 100, 2));
    let (f1, f2) = (b.dir.path().join("fw-1.bin"), b.dir.path().join("fw-2.bin"));
    std::fs::write(&f1, &v1).unwrap();
    std::fs::write(&f2, &v2).unwrap();

    let a1 = add(&b, &f1, "fw", "2.1");
    assert_eq!(a1["name"], "fw", "{a1}");
    assert_eq!(a1["size"], v1.len() as u64);
    assert_eq!(a1["sent"], v1.len() as u64, "the first add sends it all");
    let held = chunk_files(&b);
    assert_eq!(
        held as u64,
        a1["chunks"].as_u64().unwrap(),
        "one file a chunk"
    );

    // The same file again: nothing sent, the same artifact.
    let again = add(&b, &f1, "fw", "2.1");
    assert_eq!(again["sent"], 0, "{again}");
    assert_eq!(again["digest"], a1["digest"]);

    // v2.2: only the chunks around the change cross the socket.
    let a2 = add(&b, &f2, "fw", "2.2");
    let sent = a2["sent"].as_u64().unwrap();
    eprintln!(
        "v2.2 (1 % changed) sent {sent} of {} bytes ({:.1} %)",
        v2.len(),
        100.0 * sent as f64 / v2.len() as f64
    );
    assert!(sent > 0 && sent < v2.len() as u64 / 10, "{a2}");

    let list = ok(&b.run(&["artifact", "list", "--json"]));
    let labels: Vec<String> = list
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{}@{}",
                v["name"].as_str().unwrap(),
                v["version"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(labels, ["fw@2.1", "fw@2.2"]);
    // By name alone: the newest; by digest: that one.
    let newest = json(&b.run(&["artifact", "show", "fw", "--json"]));
    assert_eq!(newest["version"], "2.2");
    let d1 = a1["digest"].as_str().unwrap();
    assert_eq!(
        json(&b.run(&["artifact", "show", d1, "--json"]))["version"],
        "2.1"
    );
    let table = ok(&b.run(&["artifact", "list"]));
    assert!(
        table.contains("fw@2.1") && table.contains("ARTIFACT"),
        "{table}"
    );

    // Unknown names are "not found" (exit 3) and say what to do.
    let o = b.run(&["artifact", "show", "fw@9"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(stderr(&o).contains("outpost artifact add"), "{}", text(&o));
    let o = b.run(&["send", "dev-x", "flash", "--artifact", "nope@1"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = b.run(&["artifact", "show", "bad name"]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));

    // rm frees only the chunks no other version shares.
    let before = chunk_files(&b);
    let r = json(&b.run(&["artifact", "rm", "fw@2.2", "--json"]));
    assert!(r["freed"].as_u64().unwrap() < v2.len() as u64 / 10, "{r}");
    assert!(chunk_files(&b) < before);
    assert_eq!(
        json(&b.run(&["artifact", "show", "fw", "--json"]))["version"],
        "2.1"
    );
}

#[test]
fn a_command_names_its_artifact_and_an_artifact_a_live_command_names_cannot_be_removed() {
    let b = Box_::start();
    ok(&b.enroll("dev-1", "dev-1", &[]));
    let f = b.dir.path().join("cfg.tar");
    std::fs::write(&f, random(300_000, 3)).unwrap();
    let a = add(&b, &f, "cfg", "7");
    // dev-1 is offline: the command stays queued, naming cfg@7.
    let id = ok(&b.run(&["send", "dev-1", "apply", "--artifact", "cfg@7"]))
        .trim()
        .to_string();
    let o = b.run(&["artifact", "rm", "cfg@7"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(stderr(&o).contains(&id), "names the command: {}", text(&o));
    assert!(
        stderr(&o).contains("cancel"),
        "says what to do: {}",
        text(&o)
    );
    // Once the command has ended the artifact may go.
    ok(&b.run(&["cancel", &id]));
    let r = json(&b.run(&["artifact", "rm", "cfg", "--json"]));
    assert_eq!(r["digest"], a["digest"], "{r}");
    assert_eq!(chunk_files(&b), 0);
    // And a command may no longer name it.
    let o = b.run(&[
        "send",
        "dev-1",
        "apply",
        "--artifact",
        a["digest"].as_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

#[test]
fn a_signed_command_signs_the_artifact_it_names() {
    let b = Box_::start_with(&["--require-signed", "--name", "box-a"]);
    let dir = b.dir.path().join("keys");
    std::fs::create_dir_all(&dir).unwrap();
    ok(&b.run(&["key", "new", "alice", "--dir", dir.to_str().unwrap()]));
    let alice = dir.join("alice");
    let public = dir.join("alice.pub");
    ok(&b.run(&[
        "trust",
        "add",
        public.to_str().unwrap(),
        "--role",
        "operator",
    ]));
    ok(&b.enroll("dev-1", "dev-1", &[]));
    let f = b.dir.path().join("model.bin");
    std::fs::write(&f, random(100_000, 4)).unwrap();
    ok(&b.run(&[
        "artifact",
        "add",
        f.to_str().unwrap(),
        "--name",
        "model",
        "--version",
        "1",
    ]));
    // Unsigned with an artifact is still unsigned: refused here.
    let o = b.run(&["send", "dev-1", "load", "--artifact", "model@1"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(stderr(&o).contains("unsigned"), "{}", text(&o));
    let o = b.run(&[
        "send",
        "dev-1",
        "load",
        "--artifact",
        "model@1",
        "--sign",
        alice.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(json(&o)["state"], "queued", "{}", text(&o));
    // The audit log has the add.
    let audit = ok(&b.run(&["audit", "--json"]));
    assert!(audit.contains("artifact add"), "{audit}");
}

#[test]
fn an_artifact_over_its_budget_is_refused_before_it_is_stored() {
    let b = Box_::start_with(&["--max-artifact-disk", "1MiB"]);
    let big = b.dir.path().join("big.img");
    std::fs::write(&big, random(1_500_000, 5)).unwrap();
    let o = b.run(&[
        "artifact",
        "add",
        big.to_str().unwrap(),
        "--name",
        "big",
        "--version",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(5), "a refusal: {}", text(&o));
    let e = stderr(&o);
    assert!(
        e.contains("--max-artifact-disk") && e.contains("artifact rm"),
        "says what to do: {e}"
    );
    assert_eq!(
        names(&b),
        Vec::<String>::new(),
        "nothing half-added is listed"
    );
    assert_eq!(chunk_files(&b), 0, "no chunk was sent");
    // What fits still goes in.
    let small = b.dir.path().join("small.img");
    std::fs::write(&small, random(200_000, 6)).unwrap();
    ok(&b.run(&[
        "artifact",
        "add",
        small.to_str().unwrap(),
        "--name",
        "small",
        "--version",
        "1",
    ]));
}

#[test]
fn an_artifact_no_live_command_names_is_removed_after_the_retention() {
    let b = Box_::start_with(&["--artifact-retention", "2s"]);
    ok(&b.enroll("dev-1", "dev-1", &[]));
    let f = b.dir.path().join("a.bin");
    std::fs::write(&f, random(100_000, 7)).unwrap();
    add(&b, &f, "loose", "1");
    std::fs::write(&f, random(100_000, 8)).unwrap();
    add(&b, &f, "named", "1");
    // dev-1 is offline: its command stays live and keeps named@1.
    let id = ok(&b.run(&["send", "dev-1", "apply", "--artifact", "named@1"]))
        .trim()
        .to_string();
    cli_box::wait_for(30, "the unnamed artifact to go", || names(&b) == ["named"]);
    // Passes come every second; named@1 outlives several of them.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(names(&b), ["named"], "a live command keeps its artifact");
    ok(&b.run(&["cancel", &id]));
    cli_box::wait_for(30, "the artifact of the ended command to go", || {
        names(&b).is_empty()
    });
    assert_eq!(chunk_files(&b), 0, "its chunks went with it");
    let audit = text(&b.run(&["audit", "--json"]));
    assert!(
        audit.contains("artifact retention"),
        "the removals are audited: {audit}"
    );
}

#[test]
fn a_workflow_step_carries_the_artifact_it_names_pinned_at_start() {
    let b = Box_::start();
    ok(&b.enroll("dev-1", "dev-1", &[]));
    let f = b.dir.path().join("cfg.tar");
    std::fs::write(&f, random(150_000, 9)).unwrap();
    let a = add(&b, &f, "cfg", "1");
    let wf = b.dir.path().join("wf.toml");
    std::fs::write(
        &wf,
        "name = \"apply\"\n[steps.apply]\ntarget = \"dev-1\"\npayload = \"apply\"\nartifact = \"cfg\"\n",
    )
    .unwrap();
    let run = ok(&b.run(&["workflow", "run", wf.to_str().unwrap()]))
        .trim()
        .to_string();
    let v = json(&b.run(&["workflow", "show", &run, "--json"]));
    let step_cmd = v["steps"][0]["command"].as_str().unwrap().to_string();
    // dev-1 is offline: the step's command is live and names cfg@1.
    let o = b.run(&["artifact", "rm", a["digest"].as_str().unwrap()]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        stderr(&o).contains(&step_cmd),
        "names the step's command: {}",
        text(&o)
    );

    // A step naming what the box does not hold: the run is refused at
    // start, saying which step and what to do.
    std::fs::write(
        &wf,
        "name = \"apply\"\n[steps.apply]\ntarget = \"dev-1\"\npayload = \"apply\"\nartifact = \"fw@9\"\n",
    )
    .unwrap();
    let o = b.run(&["workflow", "run", wf.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    let e = stderr(&o);
    assert!(
        e.contains("step `apply`") && e.contains("fw@9") && e.contains("artifact add"),
        "{e}"
    );
    // A malformed name is found by `workflow check`, with its line.
    std::fs::write(
        &wf,
        "name = \"apply\"\n[steps.apply]\ntarget = \"dev-1\"\npayload = \"apply\"\nartifact = \"fw@\"\n",
    )
    .unwrap();
    let o = b.run(&["workflow", "check", wf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("wf.toml:5"), "{}", text(&o));
}
