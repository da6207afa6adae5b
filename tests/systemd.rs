//! systemd integration: the real binary, run the way systemd runs it, tells
//! a notify socket the test owns that it is ready, pings the watchdog, and
//! on SIGTERM says it is stopping and exits 0.
//! Also checks the unit file carries the settings DESIGN §9 requires.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serve_sends_ready_and_watchdog_to_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("OUTPOST_DATA_DIR", &data)
        .env("OUTPOST_LOG", "warn")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    // Ready means serving: the admin socket exists by then.
    let admin_ready = data.join("admin.sock").exists();
    // `systemctl stop`: SIGTERM; the box says it is stopping and exits 0.
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    };
    while let Ok(n) = sock.recv(&mut buf) {
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM: not a clean exit within 30 s: {status:?}"
    );
    assert!(
        seen.contains("STOPPING=1"),
        "no STOPPING=1 after SIGTERM; got: {seen:?}"
    );
    assert!(
        seen.contains("READY=1"),
        "no READY=1 within 30 s; got: {seen:?}"
    );
    assert!(
        seen.contains("WATCHDOG=1"),
        "no WATCHDOG=1 within 30 s; got: {seen:?}"
    );
    assert!(
        admin_ready,
        "READY=1 came before the admin socket was bound"
    );
}

#[test]
fn the_unit_file_has_the_required_settings() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/outpost.service"
    ))
    .unwrap();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=outpost",
        "User=outpost",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
        "ExecStart=/usr/bin/outpost serve",
    ] {
        assert!(
            unit.contains(key),
            "systemd/outpost.service lacks `{}`",
            key.trim()
        );
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped: systemd-analyze is not installed here (apt-get install systemd)");
        return;
    };
    if !out.status.success() {
        eprintln!("skipped: systemd-analyze does not run here");
        return;
    }
    // verify wants the ExecStart binary to exist; point it at the one built.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/outpost.service"
    ))
    .unwrap()
    .replace("/usr/bin/outpost", env!("CARGO_BIN_EXE_outpost"));
    let path = dir.path().join("outpost.service");
    std::fs::write(&path, unit).unwrap();
    // --man=no: the man page is installed by the package, not here.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Outside a booted systemd, verify may complain about the environment
    // (no D-Bus, unknown user); only complaints about our unit file count.
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("outpost.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{err}");
}
