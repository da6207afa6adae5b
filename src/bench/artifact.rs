//! `outpost bench --artifact SIZE`: one file fetched by N devices at once
//! (protocol 1.3), the box measured as its own process, and in the same run
//! the same file served by nginx over HTTPS to N curl clients, so the two
//! throughputs come from one machine in one state.
//!
//! Both sides start warm: the box's chunks and nginx's file were just
//! written, so both are in the page cache. Devices and curl clients run on
//! the same machine as the server, and so share its cores.

use super::{proc_cpu_seconds, proc_field};
use crate::engine::artifact::manifest::Hasher;
use crate::engine::artifact::Digest;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The whole run gives up after this; nothing in it waits unbounded.
const RUN_LIMIT: Duration = Duration::from_secs(30 * 60);
/// How often the box's RSS is read while devices fetch.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Bound on RSS samples kept (an hour at `SAMPLE_EVERY`).
const MAX_SAMPLES: usize = 36_000;

/// What one `--artifact` run measured.
#[derive(Clone, Debug, Serialize)]
pub struct ArtifactReport {
    /// The file's size, bytes.
    pub size_bytes: u64,
    /// Devices that fetched it at once (and curl clients on nginx's side).
    pub devices: usize,
    /// Chunks the box holds the file in.
    pub chunks: u64,
    /// `outpost artifact add` of the file, through the admin socket,
    /// seconds.
    pub add_s: f64,
    /// The box's utime + stime during the add, seconds.
    pub add_box_cpu_s: f64,
    /// Every device's file had the source's SHA-256.
    pub verified: bool,
    /// All devices' bytes / wall time from the first fetch to the last
    /// verified file, MB = 10^6 bytes.
    pub aggregate_mb_s: f64,
    /// Seconds from the first fetch's start to the last one's end.
    pub wall_s: f64,
    /// The fastest device's fetch, seconds.
    pub device_min_s: f64,
    /// The slowest device's fetch, seconds.
    pub device_max_s: f64,
    /// The box's utime + stime during the fetches, per GiB it sent.
    pub box_cpu_s_per_gib: f64,
    /// The same in all, seconds.
    pub box_cpu_s: f64,
    /// The box's VmHWM at the end of the run (its whole life: add too).
    pub box_peak_rss_bytes: u64,
    /// The box's VmRSS before the add, bytes.
    pub box_rss_start_bytes: u64,
    /// The highest of its VmRSS samples during the fetches, bytes.
    pub box_rss_transfer_max_bytes: u64,
    /// The mean of those samples, bytes (0 with none).
    pub box_rss_transfer_mean_bytes: u64,
    /// VmRSS samples taken during the fetches, one each `SAMPLE_EVERY`
    /// (at most `MAX_SAMPLES`).
    pub rss_samples: usize,
    /// The same file served by nginx in the same run, or why it was not.
    pub nginx: NginxOutcome,
    /// outpost's aggregate MB/s over nginx's (when nginx ran).
    pub ratio: Option<f64>,
}

/// The nginx side of the run.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum NginxOutcome {
    /// nginx served the file over HTTPS to as many curl clients as there
    /// were devices.
    Ran {
        /// All clients' bytes / wall time, MB = 10^6 bytes.
        aggregate_mb_s: f64,
        /// Seconds from the first curl's start to the last one's end.
        wall_s: f64,
        /// The fastest client's download, seconds.
        client_min_s: f64,
        /// The slowest client's download, seconds.
        client_max_s: f64,
        /// nginx's master and workers' utime + stime during the
        /// transfer, per GiB sent: the figure to set beside the box's.
        cpu_s_per_gib: f64,
        /// Every client's file had the source's SHA-256.
        verified: bool,
        /// What `nginx -v` names (`nginx/1.22.1`).
        version: String,
    },
    /// No comparison: the box's figures stand alone.
    Skipped {
        /// nginx or curl not found, or what failed while nginx ran.
        reason: String,
    },
}

/// Megabytes (10^6) per second.
pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

/// CPU seconds per GiB (2^30) of `bytes`.
pub fn cpu_per_gib(cpu_s: f64, bytes: u64) -> f64 {
    if bytes == 0 {
        return 0.0;
    }
    cpu_s / (bytes as f64 / (1u64 << 30) as f64)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl ArtifactReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let nginx = match &self.nginx {
            NginxOutcome::Ran {
                aggregate_mb_s,
                wall_s,
                client_min_s,
                client_max_s,
                cpu_s_per_gib,
                verified,
                version,
            } => format!(
                "nginx ({version}, HTTPS TLS 1.3, {} curl clients)\n\
                 aggregate            {aggregate_mb_s:>10.1} MB/s ({wall_s:.2} s wall)\n\
                 per client           {client_min_s:>10.2} s min, {client_max_s:.2} s max\n\
                 nginx CPU            {cpu_s_per_gib:>10.2} s per GiB sent (master and workers)\n\
                 identical files      {:>10}\n\
                 outpost / nginx      {:>10.2} × (goal ≥ 0.5)\n",
                self.devices,
                if *verified { "yes" } else { "NO" },
                self.ratio.unwrap_or(0.0)
            ),
            NginxOutcome::Skipped { reason } => format!("nginx comparison skipped: {reason}\n"),
        };
        format!(
            "artifact bench: {:.1} MiB ({} chunks) to {} devices (box measured as its own process)\n\
             artifact add         {:>10.2} s ({:.2} s box CPU)\n\
             aggregate            {:>10.1} MB/s ({:.2} s wall, {:.1} MiB sent)\n\
             per device           {:>10.2} s min, {:.2} s max\n\
             identical files      {:>10}\n\
             box CPU              {:>10.2} s per GiB sent ({:.2} s in all)\n\
             box peak RSS         {:>10.1} MiB (VmHWM, whole run; goal ≤ 64)\n\
             box RSS in transfer  {:>10.1} MiB max, {:.1} mean ({} samples; {:.1} before the add)\n{}",
            mib(self.size_bytes),
            self.chunks,
            self.devices,
            self.add_s,
            self.add_box_cpu_s,
            self.aggregate_mb_s,
            self.wall_s,
            mib(self.size_bytes * self.devices as u64),
            self.device_min_s,
            self.device_max_s,
            if self.verified { "yes" } else { "NO" },
            self.box_cpu_s_per_gib,
            self.box_cpu_s,
            mib(self.box_peak_rss_bytes),
            mib(self.box_rss_transfer_max_bytes),
            mib(self.box_rss_transfer_mean_bytes),
            self.rss_samples,
            mib(self.box_rss_start_bytes),
            nginx
        )
    }
}

/// Write `size` random bytes to `path`; returns their SHA-256. Streamed, so
/// the bench itself holds one block however large the file.
fn random_file(path: &Path, size: u64) -> std::io::Result<Digest> {
    use rand::RngCore;
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::thread_rng();
    let mut block = vec![0u8; 1 << 20];
    let mut h = Hasher::default();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        rng.fill_bytes(&mut block[..n]);
        h.update(&block[..n]);
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(h.finish())
}

fn file_sha256(path: &Path) -> std::io::Result<Digest> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut block = vec![0u8; 1 << 20];
    let mut h = Hasher::default();
    loop {
        let n = f.read(&mut block)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&block[..n]);
    }
}

/// Run the artifact bench with the `outpost` binary at `exe` in `dir`.
pub async fn artifact_bench(
    exe: &Path,
    dir: &Path,
    size: u64,
    n: usize,
) -> anyhow::Result<ArtifactReport> {
    tokio::time::timeout(RUN_LIMIT, run(exe, dir, size, n.max(1)))
        .await
        .map_err(|_| anyhow::anyhow!("the artifact bench did not finish in {RUN_LIMIT:?}"))?
}

async fn run(exe: &Path, dir: &Path, size: u64, n: usize) -> anyhow::Result<ArtifactReport> {
    use crate::device::{self, ConnectOptions, Received};
    use crate::shell::admin::{AdminRequest, AdminResponse};

    let source = dir.join("source.bin");
    let want = {
        let source = source.clone();
        tokio::task::spawn_blocking(move || random_file(&source, size)).await??
    };

    let box_dir = dir.join("box");
    std::fs::create_dir_all(&box_dir)?;
    let mut b = super::process::BoxProcess::start(exe, &box_dir).await?;
    let (pid, addr) = (b.pid, b.addr);
    let rss_start = b.rss();

    // The add goes through the CLI, as an operator's would.
    let cpu0 = proc_cpu_seconds(pid);
    let t = Instant::now();
    let out = tokio::process::Command::new(exe)
        .args(["artifact", "add", "--name", "bench", "--version", "1"])
        .arg(&source)
        .env("OUTPOST_DATA_DIR", &box_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let add_s = t.elapsed().as_secs_f64();
    let add_box_cpu_s = proc_cpu_seconds(pid) - cpu0;
    anyhow::ensure!(
        out.status.success(),
        "outpost artifact add failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let AdminResponse::Artifact(view) = b
        .admin
        .call(&AdminRequest::ArtifactShow("bench@1".into()))
        .await?
    else {
        anyhow::bail!("unexpected artifact show answer")
    };
    anyhow::ensure!(
        view.sha256 == want,
        "the box holds {} for the file, not its SHA-256 {}",
        view.sha256,
        want
    );

    // Enroll, connect (an endpoint each, as real devices have), and deliver
    // to each one command naming the artifact: fetch is allowed only then.
    let copts = ConnectOptions {
        server: Some(addr.to_string()),
        ..ConnectOptions::default()
    };
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("art-{i}");
        let bundle = b.enroll(&id).await?;
        conns.push((id, device::connect(&bundle, &copts).await?));
    }
    for (id, c) in &mut conns {
        let req = crate::shell::queue::SendRequest {
            target: id.clone(),
            payload: b"install".to_vec(),
            opts: crate::SendOptions::default(),
            origin: "bench".into(),
            signature: Some(crate::engine::trust::envelope::unsigned(Some(
                view.digest.0,
            ))),
        };
        let AdminResponse::Receipt(_) = b.admin.call(&AdminRequest::Send(req)).await? else {
            anyhow::bail!("unexpected send answer")
        };
        let wait = Instant::now() + Duration::from_secs(30);
        loop {
            let left = wait.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, c.next()).await {
                Ok(Ok(Some(Received::Command(_)))) => break,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => anyhow::bail!("the box closed {id}'s connection"),
                Ok(Err(e)) => anyhow::bail!("{id}: {e}"),
                Err(_) => anyhow::bail!("{id} got no command in 30 s"),
            }
        }
    }

    // RSS sampled from beside the box while the devices fetch.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        while samples.len() < MAX_SAMPLES {
            tokio::select! {
                _ = tick.tick() => samples.push(proc_field(pid, "status", "VmRSS:") * 1024),
                _ = &mut stop_rx => break,
            }
        }
        samples
    });

    let devices_dir = dir.join("devices");
    let cpu1 = proc_cpu_seconds(pid);
    let started = Instant::now();
    let mut fetches = tokio::task::JoinSet::new();
    for (id, c) in &conns {
        let conn = c.connection().clone();
        let into = devices_dir.join(id);
        let digest = view.digest;
        fetches.spawn(async move {
            std::fs::create_dir_all(&into)?;
            let t = Instant::now();
            let f = crate::device::fetch::fetch(&conn, digest, &into).await?;
            anyhow::Ok((f.path, t.elapsed().as_secs_f64()))
        });
    }
    let mut got = Vec::with_capacity(n);
    while let Some(r) = fetches.join_next().await {
        got.push(r??);
    }
    let wall_s = started.elapsed().as_secs_f64();
    let box_cpu_s = proc_cpu_seconds(pid) - cpu1;
    let _ = stop_tx.send(());
    let samples = sampler.await?;
    let peak = proc_field(pid, "status", "VmHWM:") * 1024;
    drop(conns);
    b.kill().await;

    let mut verified = true;
    for (path, _) in &got {
        let p = path.clone();
        verified &= tokio::task::spawn_blocking(move || file_sha256(&p)).await?? == want;
    }
    // The devices' copies go before nginx's arrive, so a large run needs
    // room for one side at a time.
    let _ = std::fs::remove_dir_all(&devices_dir);
    let _ = std::fs::remove_dir_all(&box_dir);
    let times: Vec<f64> = got.iter().map(|g| g.1).collect();
    let total = size * n as u64;
    let aggregate_mb_s = mb_per_s(total, wall_s);

    let nginx = match nginx_side(dir, &source, want, n).await {
        Ok(o) => o,
        Err(e) => NginxOutcome::Skipped {
            reason: format!("nginx failed: {e:#}"),
        },
    };
    let ratio = match &nginx {
        NginxOutcome::Ran {
            aggregate_mb_s: x, ..
        } => Some(aggregate_mb_s / x.max(1e-9)),
        NginxOutcome::Skipped { .. } => None,
    };
    Ok(ArtifactReport {
        size_bytes: size,
        devices: n,
        chunks: view.chunks as u64,
        add_s,
        add_box_cpu_s,
        verified,
        aggregate_mb_s,
        wall_s,
        device_min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
        device_max_s: times.iter().copied().fold(0.0, f64::max),
        box_cpu_s_per_gib: cpu_per_gib(box_cpu_s, total),
        box_cpu_s,
        box_peak_rss_bytes: peak,
        box_rss_start_bytes: rss_start,
        box_rss_transfer_max_bytes: samples.iter().copied().max().unwrap_or(0),
        box_rss_transfer_mean_bytes: if samples.is_empty() {
            0
        } else {
            samples.iter().sum::<u64>() / samples.len() as u64
        },
        rss_samples: samples.len(),
        nginx,
        ratio,
    })
}

/// The first of `names` found as an executable on PATH or in the sbin
/// folders (Debian puts nginx in /usr/sbin, off a user's PATH).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The nginx configuration for a throwaway, unprivileged-path server in
/// `root` on `port`: TLS 1.3 only, two workers, every file it writes in
/// `root`. `as_root`: workers stay root, since they read a file in a
/// folder only root can enter.
pub fn nginx_config(root: &Path, port: u16, as_root: bool) -> String {
    let r = root.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes 2;\n\
         {user}\
         pid {r}/nginx.pid;\n\
         error_log {r}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 sendfile on;\n\
         \x20 tcp_nopush on;\n\
         \x20 default_type application/octet-stream;\n\
         \x20 client_body_temp_path {r}/tmp/body;\n\
         \x20 proxy_temp_path {r}/tmp/proxy;\n\
         \x20 fastcgi_temp_path {r}/tmp/fastcgi;\n\
         \x20 uwsgi_temp_path {r}/tmp/uwsgi;\n\
         \x20 scgi_temp_path {r}/tmp/scgi;\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{port} ssl;\n\
         \x20   ssl_protocols TLSv1.3;\n\
         \x20   ssl_certificate {r}/cert.pem;\n\
         \x20   ssl_certificate_key {r}/key.pem;\n\
         \x20   root {r}/www;\n\
         \x20 }}\n\
         }}\n",
        user = if as_root { "user root;\n" } else { "" },
    )
}

/// utime + stime of nginx's master and its workers (its children).
fn nginx_cpu_seconds(master: u32) -> f64 {
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default();
    proc_cpu_seconds(master)
        + children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .map(proc_cpu_seconds)
            .sum::<f64>()
}

/// SIGKILL would reach the master only and leave its workers running:
/// SIGTERM lets the master stop them, then wait for it (bounded).
async fn stop_nginx(server: &mut tokio::process::Child) {
    if let Some(pid) = server.id() {
        // SAFETY: kill has no memory preconditions; pid is our own child,
        // not yet reaped, so it cannot name another process.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .is_err()
    {
        let _ = server.kill().await;
    }
}

async fn nginx_side(
    dir: &Path,
    source: &Path,
    want: Digest,
    n: usize,
) -> anyhow::Result<NginxOutcome> {
    let (Some(nginx), Some(curl)) = (find_program("nginx"), find_program("curl")) else {
        let missing: Vec<&str> = [("nginx", "nginx"), ("curl", "curl")]
            .into_iter()
            .filter(|(p, _)| find_program(p).is_none())
            .map(|x| x.1)
            .collect();
        return Ok(NginxOutcome::Skipped {
            reason: format!(
                "{} not found (apt-get install nginx curl)",
                missing.join(" and ")
            ),
        });
    };
    let version = tokio::process::Command::new(&nginx)
        .arg("-v")
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    let version = version
        .strip_prefix("nginx version: ")
        .unwrap_or(&version)
        .to_string();

    let root = dir.join("nginx");
    std::fs::create_dir_all(root.join("www"))?;
    std::fs::create_dir_all(root.join("tmp"))?;
    let out = root.join("out");
    std::fs::create_dir_all(&out)?;
    let served = root.join("www/f");
    if std::fs::hard_link(source, &served).is_err() {
        std::fs::copy(source, &served)?;
    }
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    std::fs::write(root.join("cert.pem"), cert.cert.pem())?;
    std::fs::write(root.join("key.pem"), cert.key_pair.serialize_pem())?;
    // A free port: the kernel's pick, let go just before nginx binds it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let conf = root.join("nginx.conf");
    std::fs::write(&conf, nginx_config(&root, port, as_root))?;
    let mut server = tokio::process::Command::new(&nginx)
        .arg("-p")
        .arg(&root)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(root.join("error.log"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let master = server.id().unwrap_or(0);
    // Whatever fails below, nginx is stopped before the error goes up.
    let ran = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if let Some(st) = server.try_wait()? {
                let log = std::fs::read_to_string(root.join("error.log")).unwrap_or_default();
                anyhow::bail!("nginx exited ({st}): {}", log.trim());
            }
            anyhow::ensure!(Instant::now() < deadline, "nginx did not listen in 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let url = format!("https://127.0.0.1:{port}/f");
        let cpu0 = nginx_cpu_seconds(master);
        let started = Instant::now();
        let mut clients = tokio::task::JoinSet::new();
        for i in 0..n {
            let file = out.join(format!("c{i}"));
            let (curl, url) = (curl.clone(), url.clone());
            clients.spawn(async move {
                let t = Instant::now();
                let o = tokio::process::Command::new(curl)
                    .args(["-skS", "--fail", "--tlsv1.3", "--max-time", "1200", "-o"])
                    .arg(&file)
                    .arg(&url)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .output()
                    .await?;
                anyhow::ensure!(
                    o.status.success(),
                    "curl: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                anyhow::Ok((file, t.elapsed().as_secs_f64()))
            });
        }
        let mut got = Vec::with_capacity(n);
        while let Some(r) = clients.join_next().await {
            got.push(r??);
        }
        let wall_s = started.elapsed().as_secs_f64();
        anyhow::Ok((got, wall_s, nginx_cpu_seconds(master) - cpu0))
    }
    .await;
    stop_nginx(&mut server).await;
    let (got, wall_s, cpu_s) = ran?;
    let mut verified = true;
    for (path, _) in &got {
        let p = path.clone();
        verified &= tokio::task::spawn_blocking(move || file_sha256(&p)).await?? == want;
    }
    let _ = std::fs::remove_dir_all(&root);
    let times: Vec<f64> = got.iter().map(|g| g.1).collect();
    let size = std::fs::metadata(source)?.len();
    Ok(NginxOutcome::Ran {
        aggregate_mb_s: mb_per_s(size * n as u64, wall_s),
        wall_s,
        client_min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
        client_max_s: times.iter().copied().fold(0.0, f64::max),
        cpu_s_per_gib: cpu_per_gib(cpu_s, size * n as u64),
        verified,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_use_decimal_megabytes_and_binary_gibibytes() {
        assert!((mb_per_s(50_000_000, 0.5) - 100.0).abs() < 1e-9);
        assert!((cpu_per_gib(3.0, 2 << 30) - 1.5).abs() < 1e-9);
        assert_eq!(cpu_per_gib(3.0, 0), 0.0);
    }

    #[test]
    fn nginx_config_keeps_every_path_in_its_folder_and_only_tls13() {
        let c = nginx_config(Path::new("/tmp/x"), 4433, false);
        assert!(c.contains("listen 127.0.0.1:4433 ssl;"));
        assert!(c.contains("ssl_protocols TLSv1.3;"));
        assert!(c.contains("worker_processes 2;"));
        assert!(!c.contains("user root"));
        // Every absolute path, whatever the directive.
        for line in c.lines().filter(|l| l.contains(" /")) {
            assert!(line.contains("/tmp/x/"), "{line}");
        }
        assert!(nginx_config(Path::new("/tmp/x"), 1, true).contains("user root;"));
    }

    #[test]
    fn the_table_says_when_nginx_was_skipped_and_shows_the_ratio_when_not() {
        let mut r = ArtifactReport {
            size_bytes: 64 << 20,
            devices: 20,
            chunks: 1000,
            add_s: 1.0,
            add_box_cpu_s: 0.5,
            verified: true,
            aggregate_mb_s: 300.0,
            wall_s: 4.0,
            device_min_s: 3.0,
            device_max_s: 4.0,
            box_cpu_s_per_gib: 2.0,
            box_cpu_s: 2.5,
            box_peak_rss_bytes: 40 << 20,
            box_rss_start_bytes: 10 << 20,
            box_rss_transfer_max_bytes: 30 << 20,
            box_rss_transfer_mean_bytes: 20 << 20,
            rss_samples: 40,
            nginx: NginxOutcome::Skipped {
                reason: "nginx not found".into(),
            },
            ratio: None,
        };
        assert!(r
            .table()
            .contains("nginx comparison skipped: nginx not found"));
        r.nginx = NginxOutcome::Ran {
            aggregate_mb_s: 600.0,
            wall_s: 2.0,
            client_min_s: 1.0,
            client_max_s: 2.0,
            cpu_s_per_gib: 1.0,
            verified: true,
            version: "nginx/1.22.1".into(),
        };
        r.ratio = Some(0.5);
        let t = r.table();
        assert!(t.contains("outpost / nginx            0.50"), "{t}");
        assert!(t.contains("300.0 MB/s"), "{t}");
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["nginx"]["status"], "ran");
        assert_eq!(j["ratio"], 0.5);
    }
}
