//! Black-box tests of operator-signed commands (issue 23) at the box: the
//! real binary, `serve --require-signed`, keys from `outpost key new`.
//! Each bad command is refused at intake with its reason (exit 5); a
//! removed key's undelivered commands end rejected, saying why.

#[path = "common/run.rs"]
mod run;
use run::{json, ok, stderr, text};
#[path = "common/cli_box.rs"]
mod cli_box;
use cli_box::{wait_for, Box_};

fn key(b: &Box_, name: &str) -> String {
    let dir = b.dir.path().join("keys");
    std::fs::create_dir_all(&dir).unwrap();
    ok(&b.run(&["key", "new", name, "--dir", dir.to_str().unwrap()]));
    dir.join(name).to_str().unwrap().to_string()
}

fn trust(b: &Box_, key: &str, extra: &[&str]) {
    let public = format!("{key}.pub");
    let mut args = vec!["trust", "add", &public];
    args.extend_from_slice(extra);
    ok(&b.run(&args));
}

/// `outpost sign` with these flags: the envelope's base64.
fn sign(b: &Box_, key: &str, target: &str, payload: &str, extra: &[&str]) -> String {
    let mut args = vec!["sign", target, payload, "--key", key];
    args.extend_from_slice(extra);
    ok(&b.run(&args)).trim().to_string()
}

/// A refused send: exit 5, and the reason in stderr.
fn refused(b: &Box_, args: &[&str], reason: &str) {
    let o = b.run(args);
    assert_eq!(o.status.code(), Some(5), "{:?}: {}", args, text(&o));
    assert!(
        stderr(&o).contains(reason),
        "{:?}: want `{reason}` in\n{}",
        args,
        text(&o)
    );
}

#[test]
fn signed_commands_run_and_every_bad_one_is_refused_at_intake_with_its_reason() {
    let mut b = Box_::start_with(&["--require-signed", "--name", "box-a"]);
    let alice = key(&b, "alice");
    trust(&b, &alice, &["--role", "operator"]);
    ok(&b.enroll("dev-1", "dev-1", &[]));
    ok(&b.enroll("dev-2", "dev-2", &[]));
    // The bundle carries the box's name, its rule and the key: the device
    // checks signatures itself.
    let bundle = std::fs::read_to_string(b.bundle_path("dev-1")).unwrap();
    assert!(bundle.contains("\nbox = box-a\n"), "{bundle}");
    assert!(bundle.contains("\nrequire-signed = true\n"), "{bundle}");
    assert!(
        bundle.contains("\ntrust = operator * ssh-ed25519 "),
        "{bundle}"
    );
    b.agent("dev-1");

    let list = json(&b.run(&["trust", "list", "--json"]));
    assert_eq!(list["name"], "box-a", "{list}");
    assert_eq!(list["require_signed"], true);
    assert_eq!(list["keys"][0]["name"], "alice");
    assert_eq!(list["keys"][0]["role"], "operator");

    // Unsigned: refused, and nothing queued.
    refused(&b, &["send", "dev-1", "ping"], "unsigned");

    // Signed with a trusted key: taken and run (the audience asked of the box).
    let r = json(&b.run(&[
        "send", "dev-1", "ping", "--sign", &alice, "--wait", "20s", "--json",
    ]));
    assert_eq!(r["state"], "succeeded", "{r}");

    // Bulk: every line signed with the key, each its own command.
    let lines = b.dir.path().join("lines.txt");
    std::fs::write(&lines, "one\ntwo\n").unwrap();
    let out = ok(&b.run(&[
        "send",
        "dev-2",
        "--lines",
        lines.to_str().unwrap(),
        "--sign",
        &alice,
    ]));
    assert_eq!(out.lines().count(), 2, "{out}");
    refused(
        &b,
        &["send", "dev-2", "--lines", lines.to_str().unwrap()],
        "unsigned",
    );

    // A key the box does not trust.
    let mallory = key(&b, "mallory");
    refused(
        &b,
        &["send", "dev-1", "ping", "--sign", &mallory],
        "does not trust",
    );

    // One envelope: taken once; again is a replay; to another target, with
    // another payload or for another box it is not what was signed.
    let env = sign(&b, &alice, "dev-2", "reboot", &["--audience", "box-a"]);
    let first = json(&b.run(&["send", "dev-2", "reboot", "--envelope", &env, "--json"]));
    assert_eq!(first["state"], "queued", "{first}");
    refused(
        &b,
        &["send", "dev-2", "reboot", "--envelope", &env],
        "replay",
    );
    refused(
        &b,
        &["send", "dev-1", "reboot", "--envelope", &env],
        "target is not the one signed",
    );
    refused(
        &b,
        &["send", "dev-2", "rm -rf /", "--envelope", &env],
        "payload is not the one signed",
    );
    refused(
        &b,
        &[
            "send",
            "dev-2",
            "reboot",
            "--priority",
            "high",
            "--envelope",
            &env,
        ],
        "priority is not the one signed",
    );
    let other_box = sign(&b, &alice, "dev-2", "x", &["--audience", "box-b"]);
    refused(
        &b,
        &["send", "dev-2", "x", "--envelope", &other_box],
        "signed for `box-b`, not for this box (`box-a`)",
    );

    // Expired: a signature good for one second, sent two seconds later.
    let short = sign(
        &b,
        &alice,
        "dev-1",
        "late",
        &["--audience", "box-a", "--expires", "1s"],
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    refused(
        &b,
        &["send", "dev-1", "late", "--envelope", &short],
        "expired",
    );

    // A forged envelope: a byte of the signed claims changed.
    let forged = flip_a_claims_byte(&env);
    refused(
        &b,
        &["send", "dev-2", "reboot", "--envelope", &forged],
        "bad signature",
    );

    // Roles and targets bind a key.
    let bob = key(&b, "bob");
    trust(&b, &bob, &["--role", "operator", "--targets", "dev-9*"]);
    refused(
        &b,
        &["send", "dev-1", "x", "--sign", &bob],
        "may sign only for targets matching `dev-9*`",
    );
    let carol = key(&b, "carol");
    trust(&b, &carol, &["--role", "viewer"]);
    refused(
        &b,
        &["send", "dev-1", "x", "--sign", &carol],
        "sending needs the operator role",
    );
    drop(b.agents.pop());
}

/// The envelope with one bit of its signed claims flipped (in the expiry,
/// 40 bytes before the claims end: after it come only the audience and the
/// key id), the signature left as it was.
fn flip_a_claims_byte(b64: &str) -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::STANDARD;
    let mut bytes = e.decode(b64).unwrap();
    let at = bytes.len() - 64 - 1 - 40;
    bytes[at] ^= 0x01;
    e.encode(bytes)
}

#[test]
fn a_removed_keys_undelivered_commands_end_rejected_saying_why() {
    let mut b = Box_::start_with(&["--require-signed", "--name", "box-a"]);
    let alice = key(&b, "alice");
    trust(&b, &alice, &["--role", "operator"]);
    ok(&b.enroll("dev-1", "dev-1", &[]));
    // Queued while dev-1 is offline, then the key is removed.
    let r = json(&b.run(&["send", "dev-1", "ping", "--sign", &alice, "--json"]));
    let id = r["id"].as_str().unwrap().to_string();
    ok(&b.run(&["trust", "remove", "alice"]));
    let list = json(&b.run(&["trust", "list", "--json"]));
    assert_eq!(list["keys"].as_array().unwrap().len(), 0, "{list}");
    assert_eq!(list["removed"][0]["name"], "alice", "{list}");
    // New commands it signs are refused at once…
    refused(
        &b,
        &["send", "dev-1", "ping", "--sign", &alice],
        "was removed from the trust set",
    );
    // …and the one queued ends rejected when its device comes, never run.
    b.agent("dev-1");
    let mut last = serde_json::Value::Null;
    wait_for(20, "the queued command ends", || {
        last = json(&b.run(&["show", &id, "--json"]));
        last["state"] != "queued" && last["state"] != "delivered"
    });
    let shown = last.to_string();
    assert!(shown.contains("removed from the trust set"), "{shown}");
    assert!(!shown.contains("\"succeeded\""), "{shown}");
}

#[test]
fn key_ids_and_the_trust_list_read_the_same_in_text_as_in_json() {
    let b = Box_::start_with(&["--name", "box-k"]);
    // No key yet: the list says how to add one.
    let empty = ok(&b.run(&["trust", "list"]));
    assert!(
        empty.starts_with("box box-k: signatures optional"),
        "{empty}"
    );
    assert!(empty.contains("outpost trust add"), "{empty}");
    let carol = key(&b, "carol");
    // The id from either half of the pair is the same, and the one the
    // box lists once the key is trusted.
    let from_private = ok(&b.run(&["key", "id", &carol])).trim().to_string();
    let from_public = ok(&b.run(&["key", "id", &format!("{carol}.pub")]))
        .trim()
        .to_string();
    assert_eq!(from_private, from_public);
    trust(
        &b,
        &carol,
        &["--role", "operator", "--targets", "tag:line-3"],
    );
    let list = json(&b.run(&["trust", "list", "--json"]));
    assert_eq!(list["keys"][0]["id"], from_public.as_str(), "{list}");
    let text_list = ok(&b.run(&["trust", "list"]));
    let row = text_list
        .lines()
        .find(|l| l.starts_with("carol"))
        .unwrap_or_else(|| panic!("no row for carol: {text_list}"));
    assert!(row.contains(&from_public), "{text_list}");
    assert!(
        row.contains("operator") && row.contains("tag:line-3"),
        "{text_list}"
    );
    // A name that cannot be a file name is a usage error, and no key is
    // written for it.
    let dir = b.dir.path().join("keys");
    let o = b.run(&["key", "new", "../evil", "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        stderr(&o).contains("cannot be a key's file name"),
        "{}",
        text(&o)
    );
    assert!(!b.dir.path().join("evil").exists());
    // `--json` names both files and the id.
    let v = json(&b.run(&[
        "key",
        "new",
        "dave",
        "--dir",
        dir.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["private"], dir.join("dave").to_str().unwrap(), "{v}");
    assert!(
        std::path::Path::new(v["public"].as_str().unwrap()).exists(),
        "{v}"
    );
    let id = ok(&b.run(&["key", "id", v["public"].as_str().unwrap()]));
    assert_eq!(v["id"], id.trim());
}
