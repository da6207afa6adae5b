//! Crash test of the durable queue: a child process enqueues in a loop and
//! prints each id once its enqueue returned; the parent SIGKILLs it at random
//! instants, reopens the store, and checks that every printed id is there.
//! Guards invariant 1 (no acknowledged command is ever lost).

use outpost::shell::queue::{self, QueueError, SendRequest, ServiceOptions};
use outpost::shell::store::{DeviceRecord, Store, StoreOptions};
use outpost::{CommandId, SendOptions};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "OUTPOST_CRASH_CHILD_DIR";
const KILLS: usize = 20;

/// The child's body: runs only when the parent re-executes this test binary
/// with `CHILD_ENV` set. Enqueues from 8 concurrent producers forever.
#[test]
fn crash_child_entry() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = Store::open(Path::new(&dir), &StoreOptions::default()).unwrap();
        let q = queue::open(store, ServiceOptions::default()).unwrap();
        q.enroll(device("d0")).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<CommandId>();
        for p in 0..8 {
            let q = q.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let r = q
                        .send(SendRequest {
                            target: "d0".into(),
                            payload: format!("p{p}-{i}").into_bytes(),
                            opts: SendOptions::default(),
                            origin: "crash-test".into(),
                            signature: None,
                        })
                        .await
                        .unwrap();
                    tx.send(r.id).unwrap();
                }
            });
        }
        let mut out = std::io::stdout().lock();
        // Bounded: the parent kills us long before this.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let id = rx.recv().await.unwrap();
            writeln!(out, "{id}").unwrap();
            out.flush().unwrap();
        }
    });
}

fn device(id: &str) -> DeviceRecord {
    DeviceRecord::new(id)
}

#[test]
fn sigkill_at_random_points_loses_no_acknowledged_command() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acknowledged: Vec<CommandId> = Vec::new();
    let mut seed: u64 = 0x005E_ED0F_C4A5;
    let started = Instant::now();
    for round in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut ids = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(id) = line.trim().parse::<CommandId>() {
                    if ids.is_empty() {
                        let _ = first_tx.send(());
                    }
                    ids.push(id);
                }
            }
            ids
        });
        // Kill at a random instant 0–500 ms into steady enqueueing.
        if first_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "round {round}: the child acknowledged nothing in 20 s; its stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(seed % 500));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let printed = reader.join().unwrap();
        acknowledged.extend(printed);

        // Reopen in this process and check every acknowledged id.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let missing = rt.block_on(async {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let q = queue::open(store, ServiceOptions::default()).unwrap();
            // Concurrent lookups: the writer batches them like any request.
            let mut tasks = tokio::task::JoinSet::new();
            for chunk in acknowledged.chunks(1000) {
                let (q, chunk) = (q.clone(), chunk.to_vec());
                tasks.spawn(async move {
                    let mut missing = Vec::new();
                    for id in chunk {
                        match q.show(id).await {
                            Ok(_) => {}
                            Err(QueueError::NotFound(_)) => missing.push(id),
                            Err(e) => panic!("show {id}: {e}"),
                        }
                    }
                    missing
                });
            }
            let mut missing = Vec::new();
            while let Some(m) = tasks.join_next().await {
                missing.extend(m.unwrap());
            }
            let stats = q.stats().await.unwrap();
            let unique: HashSet<_> = acknowledged.iter().collect();
            assert!(
                stats.queued >= unique.len() as u64,
                "round {round}: {} queued < {} acknowledged",
                stats.queued,
                unique.len()
            );
            q.shutdown().await;
            missing
        });
        assert!(
            missing.is_empty(),
            "round {round}: {} acknowledged commands lost, e.g. {}",
            missing.len(),
            missing[0]
        );
    }
    assert!(
        acknowledged.len() > KILLS,
        "the child made progress ({} acks)",
        acknowledged.len()
    );
    eprintln!(
        "crash test: {KILLS} kills, {} acknowledged commands, none lost ({:.1} s)",
        acknowledged.len(),
        started.elapsed().as_secs_f64()
    );
}
