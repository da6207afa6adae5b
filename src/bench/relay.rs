//! An impaired UDP path for tests and benchmarks: a relay on loopback that
//! forwards datagrams to a target after a delay, dropping some. Where the
//! kernel has no netem (or the test is not root) this still gives a QUIC
//! link a slow, lossy path without touching any address but the loopback.
//!
//! Each direction is delayed by `delay` and loses `loss` of its datagrams,
//! independently; a client address gets its own socket toward the target,
//! so several clients (or one that restarted) each keep their own path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;

/// How the path is impaired.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    /// One-way delay (the round trip is twice this).
    pub delay: Duration,
    /// Fraction of datagrams dropped in each direction, 0.0–1.0.
    pub loss: f64,
}

/// A running relay; dropping it stops it.
pub struct Relay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    cut: Arc<AtomicBool>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Listen on `127.0.0.1:port` (0: any free port) and forward to `target`.
    pub async fn start(port: u16, target: SocketAddr, imp: Impairment) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind(("127.0.0.1", port)).await?);
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(front, target, imp, None, cut.clone()));
        Ok(Relay { addr, task, cut })
    }

    /// [`Relay::start`] with each direction also limited to `rate_bps`
    /// bytes per second (a datagram leaves no sooner than the previous one
    /// plus its own size at that rate), so a transfer takes a known time.
    pub async fn start_limited(
        port: u16,
        target: SocketAddr,
        imp: Impairment,
        rate_bps: u64,
    ) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind(("127.0.0.1", port)).await?);
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(front, target, imp, Some(rate_bps.max(1)), cut.clone()));
        Ok(Relay { addr, task, cut })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cut the path (every datagram dropped, both ways) or mend it: a
    /// partition that the peers see only as silence.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

fn pass(loss: f64) -> bool {
    loss <= 0.0 || rand::random::<f64>() >= loss
}

/// One direction of the path: datagrams leave in the order they came, each
/// `delay` after it arrived. (A task per datagram would let the timer wake
/// them out of order, and QUIC reads reordering as loss.)
fn lane(
    imp: Impairment,
    rate: Option<u64>,
    cut: Arc<AtomicBool>,
    send: impl Fn(Vec<u8>) -> tokio::task::JoinHandle<()> + Send + 'static,
) -> tokio::sync::mpsc::UnboundedSender<Vec<u8>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = send(data).await;
        }
    });
    let (in_tx, mut in_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let mut last = tokio::time::Instant::now();
        while let Some(data) = in_rx.recv().await {
            if cut.load(Ordering::Relaxed) || !pass(imp.loss) {
                continue;
            }
            let mut due = tokio::time::Instant::now() + imp.delay;
            if let Some(r) = rate {
                let wire = Duration::from_secs_f64(data.len() as f64 / r as f64);
                due = due.max(last + wire);
                last = due;
            }
            if tx.send((due, data)).is_err() {
                return;
            }
        }
    });
    in_tx
}

async fn run(
    front: Arc<UdpSocket>,
    target: SocketAddr,
    imp: Impairment,
    rate: Option<u64>,
    cut: Arc<AtomicBool>,
) {
    let mut backs: HashMap<SocketAddr, tokio::sync::mpsc::UnboundedSender<Vec<u8>>> =
        HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        let up = match backs.get(&client) {
            Some(up) => up.clone(),
            None => {
                let Ok(b) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if b.connect(target).await.is_err() {
                    continue;
                }
                let b = Arc::new(b);
                // Replies from the target go back to this client.
                let f = front.clone();
                let down = lane(imp, rate, cut.clone(), move |data| {
                    let f = f.clone();
                    tokio::spawn(async move {
                        let _ = f.send_to(&data, client).await;
                    })
                });
                let b2 = b.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = b2.recv(&mut buf).await {
                        if down.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                });
                let up = lane(imp, rate, cut.clone(), move |data| {
                    let b = b.clone();
                    tokio::spawn(async move {
                        let _ = b.send(&data).await;
                    })
                });
                backs.insert(client, up.clone());
                up
            }
        };
        let _ = up.send(buf[..n].to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_arrive_late_both_ways_and_loss_drops_some() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(
            0,
            server.local_addr().unwrap(),
            Impairment {
                delay: Duration::from_millis(40),
                loss: 0.0,
            },
        )
        .await
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t = tokio::time::Instant::now();
        client.send_to(b"ping", relay.addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert!(t.elapsed() >= Duration::from_millis(40));
        server.send_to(b"pong", from).await.unwrap();
        let (n, back) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], back), (&b"pong"[..], relay.addr()));
        assert!(t.elapsed() >= Duration::from_millis(80));

        let lossy = Relay::start(
            0,
            server.local_addr().unwrap(),
            Impairment {
                delay: Duration::ZERO,
                loss: 1.0,
            },
        )
        .await
        .unwrap();
        client.send_to(b"lost", lossy.addr()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(200), server.recv_from(&mut buf)).await;
        assert!(r.is_err(), "a loss of 1.0 drops everything");
    }
}
