//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`) through the same
//! checks the fuzz targets run (`outpost::fuzzing`): seconds, in CI, so
//! whatever a fuzzer once found stays fixed. `OUTPOST_WRITE_SEEDS=1` writes
//! the seed inputs (the protocol's examples, admin requests, the example
//! config) before replaying.

use outpost::engine::command::{CommandId, SendOptions};
use outpost::fuzzing;
use outpost::proto;
use outpost::shell::admin::AdminRequest;
use outpost::shell::queue::SendRequest;
use std::path::{Path, PathBuf};

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 4] = [
    ("device_frame", fuzzing::device_frame),
    ("box_frame", fuzzing::box_frame),
    ("admin_request", fuzzing::admin_request),
    ("config", fuzzing::config),
];

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn write_seeds() {
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    };
    for (i, (_, frame)) in proto::examples().into_iter().enumerate() {
        let body = &frame[4..];
        if proto::decode::<proto::DeviceFrame>(body).is_ok() {
            put("device_frame", &i.to_string(), body);
        }
        if proto::decode::<proto::BoxFrame>(body).is_ok() {
            put("box_frame", &i.to_string(), body);
        }
    }
    let reqs = [
        AdminRequest::Send(SendRequest {
            target: "tag:line-3".into(),
            payload: b"reboot".to_vec(),
            opts: SendOptions {
                ttl_ms: Some(60_000),
                key: Some("k".into()),
                ..SendOptions::default()
            },
            origin: "cli".into(),
            signature: None,
        }),
        AdminRequest::Show(CommandId(7)),
        AdminRequest::Status,
        AdminRequest::Wait {
            id: CommandId(9),
            timeout_ms: 1000,
        },
        AdminRequest::Watch {
            device: Some("dev-1".into()),
        },
    ];
    for (i, r) in reqs.iter().enumerate() {
        put("admin_request", &i.to_string(), &proto::encode(r)[4..]);
    }
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/outpost.toml"),
    )
    .unwrap();
    let uncommented: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.starts_with("[[") || rest.contains(" = ") => format!("{rest}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    put("config", "example", example.as_bytes());
    put("config", "all-keys", uncommented.as_bytes());
}

#[test]
fn the_fuzz_corpus_replays_cleanly() {
    if std::env::var_os("OUTPOST_WRITE_SEEDS").is_some() {
        write_seeds();
    }
    let mut total = 0;
    for (target, check) in TARGETS {
        let dir = corpus().join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| check(&bytes));
            assert!(
                r.is_ok(),
                "{target}: {} makes the check panic",
                path.display()
            );
            n += 1;
        }
        assert!(n > 0, "no corpus for {target} in {}", dir.display());
        total += n;
    }
    println!("replayed {total} corpus inputs");
}
