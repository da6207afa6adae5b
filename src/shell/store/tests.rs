use super::*;
use crate::engine::command::{Command, CommandId, Priority, State};
use crate::engine::journal::Enqueued;

pub(super) fn cmd(n: u64) -> Entry {
    Entry::Enqueued(Enqueued {
        command: Command {
            id: CommandId::new(n, n as u128),
            target: "dev-1".into(),
            priority: Priority::Normal,
            payload: vec![7; 100],
            created_at: n,
            expires_at: None,
            max_attempts: 3,
            key: None,
            after: None,
            not_before: None,
            origin: "cli".into(),
            signature: None,
        },
        device: "dev-1".into(),
        order: n,
        gen: 0,
        attempts: 0,
        not_before: None,
    })
}

fn result(n: u64) -> ResultRecord {
    ResultRecord {
        id: CommandId::new(n, n as u128),
        gen: 0,
        device: "dev-1".into(),
        target: "dev-1".into(),
        priority: Priority::Normal,
        state: State::Succeeded,
        outcome: None,
        error: None,
        attempts: 1,
        max_attempts: 3,
        created_at: n,
        finished_at: n,
        origin: "cli".into(),
        key: None,
        command: None,
        children: Vec::new(),
    }
}

#[test]
fn the_live_hint_survives_a_reopen_and_is_never_a_replayed_group() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(s.live_hint(), 0, "a new store knows nothing");
        s.commit(&GroupWrite {
            seq: 1,
            journal: vec![cmd(1)],
            live_hint: Some(1234),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.live_hint(), 1234);
        s.set_live_hint(99).unwrap();
        s.flush().unwrap();
    }
    let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    assert_eq!(s.live_hint(), 99);
    let groups: Vec<Group> = s.replay().collect::<Result<_, _>>().unwrap();
    assert_eq!(groups.len(), 1, "{groups:?}");
    // A hint of the wrong length reads as unknown, not as an error.
    s.journal.insert(KEY_LIVE_HINT, &[1u8, 2, 3][..]).unwrap();
    assert_eq!(s.live_hint(), 0);
}

#[test]
fn cursors_keep_their_epoch_and_one_written_before_epochs_reads_as_unknown() {
    use crate::engine::journal::Cursor;
    let dir = tempfile::tempdir().unwrap();
    let epoch = {
        let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        s.commit(&GroupWrite {
            seq: 1,
            cursors: vec![("e1".into(), Cursor { epoch: 9, seq: 41 })],
            ..Default::default()
        })
        .unwrap();
        // As a build before 1.6 wrote it: the seq alone.
        s.journal
            .insert(cursor_key("e2"), &7u64.to_be_bytes())
            .unwrap();
        s.uplink_epoch().unwrap()
    };
    let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let mut c = s.cursors().unwrap();
    c.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        c,
        [
            ("e1".to_string(), Cursor { epoch: 9, seq: 41 }),
            ("e2".to_string(), Cursor { epoch: 0, seq: 7 }),
        ]
    );
    assert_eq!(s.uplink_epoch().unwrap(), epoch, "kept across opens");
    let renewed = s.renew_uplink_epoch().unwrap();
    assert_ne!(renewed, epoch);
    assert_eq!(s.uplink_epoch().unwrap(), renewed);
    s.journal.insert(cursor_key("e3"), &[1u8, 2][..]).unwrap();
    let e = s.cursors().unwrap_err().to_string();
    assert!(e.contains("`e3`") && e.contains("wrong length"), "{e}");
}

#[test]
fn groups_replay_in_commit_order_and_drops_take_effect() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        for seq in 1..=3 {
            s.commit(&GroupWrite {
                seq,
                journal: vec![cmd(seq)],
                results: if seq > 1 {
                    vec![result(seq - 1)]
                } else {
                    vec![]
                },
                ..Default::default()
            })
            .unwrap();
        }
        s.commit(&GroupWrite {
            seq: 4,
            drop_journal: vec![1],
            ..Default::default()
        })
        .unwrap();
    }
    let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let order: Vec<(char, u64)> = s
        .replay()
        .map(|g| match g.unwrap() {
            Group::Journal(s, _) => ('J', s),
            Group::Results(s, _) => ('R', s),
        })
        .collect();
    assert_eq!(order, vec![('J', 2), ('R', 2), ('J', 3), ('R', 3)]);
    assert!(s.read_journal(1).unwrap().is_none());
    assert_eq!(s.read_journal(2).unwrap().unwrap(), vec![cmd(2)]);
}

#[test]
fn a_restore_moves_the_outbox_seqs_ahead_only_of_a_box_that_sent_any() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    s.skip_outbox_seqs(100).unwrap();
    assert_eq!(s.outbox_next_seq().unwrap(), 1);
    s.commit(&GroupWrite {
        seq: 1,
        outbox_next: Some(7),
        ..Default::default()
    })
    .unwrap();
    s.skip_outbox_seqs(100).unwrap();
    assert_eq!(s.outbox_next_seq().unwrap(), 107);
}

#[test]
fn the_outbox_is_written_with_its_group_and_its_seq_survives_the_drops() {
    use crate::engine::journal::{UpEntry, UpItem};
    let dir = tempfile::tempdir().unwrap();
    let up = |seq| UpEntry {
        seq,
        item: UpItem::Result(result(seq)),
    };
    {
        let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(s.outbox_next_seq().unwrap(), 1);
        s.commit(&GroupWrite {
            seq: 1,
            results: vec![result(1)],
            outbox: vec![up(1), up(2)],
            outbox_next: Some(3),
            ..Default::default()
        })
        .unwrap();
        s.commit(&GroupWrite {
            seq: 2,
            outbox: vec![up(3)],
            outbox_next: Some(4),
            ..Default::default()
        })
        .unwrap();
        s.commit(&GroupWrite {
            seq: 3,
            drop_outbox: vec![1],
            ..Default::default()
        })
        .unwrap();
    }
    let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let groups: Vec<(u64, Vec<UpEntry>)> = s.outbox_groups().map(Result::unwrap).collect();
    assert_eq!(groups, vec![(2, vec![up(3)])]);
    assert!(s.read_outbox(1).unwrap().is_none());
    assert_eq!(s.read_outbox(2).unwrap().unwrap(), vec![up(3)]);
    assert_eq!(s.outbox_next_seq().unwrap(), 4);
    // The outbox is not part of the queue's replay.
    assert_eq!(s.replay().count(), 1);
}

#[test]
fn an_open_waits_for_a_lock_let_go_a_moment_later() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    // The holder goes away while the second open is already waiting, as
    // sled's threads let go of a dropped database.
    let closer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(first);
    });
    let second = Store::open(dir.path(), &StoreOptions::default());
    closer.join().unwrap();
    assert!(second.is_ok(), "{:?}", second.err());
}

#[test]
fn a_second_open_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    // flock conflicts between open file descriptions, so a second open in
    // the same process meets the same refusal as another process would.
    let err = Store::open(dir.path(), &StoreOptions::default())
        .err()
        .expect("second open must be refused");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("is another outpost running?"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
}

#[test]
fn newer_schema_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        s.force_schema(SCHEMA_VERSION + 1).unwrap();
    }
    let err = Store::open(dir.path(), &StoreOptions::default())
        .err()
        .expect("newer schema must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("schema {}", SCHEMA_VERSION + 1)),
        "{msg}"
    );
    assert!(msg.contains(&format!("up to {SCHEMA_VERSION}")), "{msg}");
}

#[test]
fn undecodable_group_is_reported_as_corrupt_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    s.journal
        .insert(key(KIND_JOURNAL, 9, 0), &[0xff, 0xff, 0xff][..])
        .unwrap();
    let err = s
        .replay()
        .find_map(|g| g.err())
        .expect("corruption reported");
    let msg = err.to_string();
    assert!(
        msg.contains("corrupt") && msg.contains("journal group 9 chunk 0"),
        "{msg}"
    );
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
}

#[test]
fn large_groups_are_chunked_and_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let journal: Vec<Entry> = (0..1000).map(cmd).collect();
    let results: Vec<ResultRecord> = (0..1000).map(result).collect();
    s.commit(&GroupWrite {
        seq: 5,
        journal: journal.clone(),
        results: results.clone(),
        ..Default::default()
    })
    .unwrap();
    let n = s.journal.scan_prefix(prefix(KIND_JOURNAL, 5)).count();
    assert!(
        n >= 4,
        "1000 entries of ~150 B span several chunks, got {n}"
    );
    for v in s.journal.iter().values() {
        assert!(v.unwrap().len() <= CHUNK_BYTES + 5);
    }
    assert_eq!(s.read_journal(5).unwrap().unwrap(), journal);
    assert_eq!(s.read_results(5).unwrap().unwrap(), results);
    let groups: Vec<Group> = s.replay().collect::<Result<_, _>>().unwrap();
    assert_eq!(groups.len(), 2);
    s.commit(&GroupWrite {
        seq: 6,
        drop_journal: vec![5],
        drop_results: vec![5],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.journal.scan_prefix([KIND_JOURNAL]).count()
            + s.journal.scan_prefix([KIND_RESULTS]).count(),
        0,
        "every chunk dropped"
    );
}

#[test]
fn device_records_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let rec = DeviceRecord {
        id: "dev-7".into(),
        tags: vec!["line-3".into()],
        caps: vec!["camera".into()],
        enrolled_at: 5,
        revoked: false,
        last_seen: None,
        cert: Some([7; 32]),
    };
    s.put_device(&rec).unwrap();
    assert_eq!(s.devices().unwrap(), vec![rec]);
}

#[test]
fn a_device_record_from_before_the_certificate_pin_still_reads() {
    // The layout of a record written before `cert` existed, and what a
    // binary from then reads of a record written now.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Old {
        id: String,
        tags: Vec<String>,
        caps: Vec<String>,
        enrolled_at: u64,
        revoked: bool,
        last_seen: Option<u64>,
    }
    let old = Old {
        id: "dev-1".into(),
        tags: vec!["a".into()],
        caps: vec![],
        enrolled_at: 9,
        revoked: true,
        last_seen: Some(3),
    };
    let rec = decode_device(&encode(&old)).unwrap();
    assert_eq!(
        (rec.id.as_str(), rec.revoked, rec.cert),
        ("dev-1", true, None)
    );
    let pinned = DeviceRecord {
        cert: Some([1; 32]),
        ..rec.clone()
    };
    let bytes = encode_device(&pinned);
    assert_eq!(decode::<Old>(&bytes).unwrap(), old);
    assert_eq!(decode_device(&bytes).unwrap(), pinned);
    // The outbox carries the record without the pin, in the old layout.
    assert_eq!(decode::<Old>(&encode(&pinned)).unwrap(), old);
}

mod options {
    use super::*;

    #[test]
    fn sleds_minimum_cache_works_and_below_it_is_refused_before_sled_panics() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(
                dir.path(),
                &StoreOptions {
                    cache_bytes: MIN_CACHE_BYTES,
                },
            )
            .unwrap();
            for seq in 1..=20u64 {
                s.put_device(&DeviceRecord::new(format!("d{seq}"))).unwrap();
                s.commit(&GroupWrite {
                    seq,
                    ..Default::default()
                })
                .unwrap();
            }
            s.flush().unwrap();
        }
        let s = Store::open(
            dir.path(),
            &StoreOptions {
                cache_bytes: MIN_CACHE_BYTES,
            },
        )
        .unwrap();
        assert_eq!(s.devices().unwrap().len(), 20);
        drop(s);
        // sled itself, one byte below: the panic the check keeps away.
        let p = std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(dir.path().join("raw"))
                .cache_capacity(MIN_CACHE_BYTES - 1)
                .open()
        });
        assert!(p.is_err(), "sled's minimum moved: update MIN_CACHE_BYTES");
        let e = Store::open(
            dir.path(),
            &StoreOptions {
                cache_bytes: MIN_CACHE_BYTES - 1,
            },
        )
        .err()
        .expect("refused");
        assert!(matches!(e, StoreError::BadOptions(_)), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("minimum of 256 bytes") && !m.contains("corrupt"),
            "{m}"
        );
    }
}
