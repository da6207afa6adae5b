//! A 3-node NATS JetStream cluster on 127.0.0.1 for tests and benches,
//! from Debian's `nats-server`; each node stopped by the PID we started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `N` distinct free ports: each listener is held until all are drawn, so
/// the kernel cannot hand out one port twice.
fn free_tcp_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

pub fn nats_server() -> Option<String> {
    let found = Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Some("nats-server".into())
    } else {
        println!("SKIPPED: nats-server is not installed (Debian package nats-server; .ci/run installs it)");
        None
    }
}

/// Three nats-server processes clustered on loopback, JetStream on.
pub struct Cluster {
    bin: String,
    dir: PathBuf,
    ports: [u16; 3],
    cluster_ports: [u16; 3],
    nodes: [Option<Child>; 3],
}

impl Cluster {
    /// Start the three nodes. A port picked free can be taken before the
    /// node binds it (by anything else on the machine: another test run's
    /// cluster): a node that exits at once is retried, the cluster on fresh
    /// ports, three times before it fails with the node's own words.
    pub fn start(bin: &str, dir: &Path) -> Cluster {
        Self::start_some(bin, dir, 3)
    }

    /// Start the first `up` of the three nodes; the others stay down
    /// until [`Cluster::start_node`].
    pub fn start_some(bin: &str, dir: &Path, up: usize) -> Cluster {
        let mut last = String::new();
        for _ in 0..3 {
            let p = free_tcp_ports::<6>();
            let mut c = Cluster {
                bin: bin.into(),
                dir: dir.to_path_buf(),
                ports: [p[0], p[1], p[2]],
                cluster_ports: [p[3], p[4], p[5]],
                nodes: [None, None, None],
            };
            match (0..up).try_for_each(|i| c.try_start_node(i)) {
                Ok(()) => return c,
                Err(e) => last = e, // dropping `c` kills what started
            }
        }
        panic!("the NATS cluster did not start: {last}");
    }

    /// Start (or restart) node `i` on its ports.
    #[allow(dead_code)] // tests/nats.rs restarts nodes; benches/nats.rs does not
    pub fn start_node(&mut self, i: usize) {
        if let Err(e) = self.try_start_node(i) {
            panic!("{e}");
        }
    }

    fn try_start_node(&mut self, i: usize) -> Result<(), String> {
        let routes: Vec<String> = self
            .cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let conf = self.dir.join(format!("n{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n}}\ncluster {{\n  name: outpost-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                self.ports[i],
                self.dir.join(format!("js{i}")).display(),
                self.cluster_ports[i],
                routes.join(", ")
            ),
        )
        .unwrap();
        let log = self.dir.join(format!("n{i}.log"));
        let mut child = Command::new(&self.bin)
            .args(["-c", conf.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nats-server");
        let said = || {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            t.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
        };
        // A node is up when its last listener, the route port, is: it
        // opens the client port and says "ready" first, and a route port
        // taken meanwhile ends it a moment later (fatal), leaving a
        // two-node cluster where no R3 stream can be placed.
        let routes_open = format!(
            "Listening for route connections on 127.0.0.1:{}",
            self.cluster_ports[i]
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("nats-server n{i} exited ({st}): {}", said()));
            }
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            if log_text.contains(&routes_open)
                && std::net::TcpStream::connect(("127.0.0.1", self.ports[i])).is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "nats-server n{i} did not open its ports within 20 s: {}",
                    said()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.nodes[i] = Some(child);
        Ok(())
    }

    /// SIGKILL one node (by the PID we started).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}
