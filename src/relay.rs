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
        let task = tokio::spawn(run(front, target, imp));
        Ok(Relay { addr, task })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn pass(loss: f64) -> bool {
    loss <= 0.0 || rand::random::<f64>() >= loss
}

async fn run(front: Arc<UdpSocket>, target: SocketAddr, imp: Impairment) {
    let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        let back = match backs.get(&client) {
            Some(b) => b.clone(),
            None => {
                let Ok(b) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if b.connect(target).await.is_err() {
                    continue;
                }
                let b = Arc::new(b);
                backs.insert(client, b.clone());
                // Replies from the target go back to this client.
                let (b2, f2) = (b.clone(), front.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = b2.recv(&mut buf).await {
                        if pass(imp.loss) {
                            let data = buf[..n].to_vec();
                            let f = f2.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(imp.delay).await;
                                let _ = f.send_to(&data, client).await;
                            });
                        }
                    }
                });
                b
            }
        };
        if pass(imp.loss) {
            let data = buf[..n].to_vec();
            tokio::spawn(async move {
                tokio::time::sleep(imp.delay).await;
                let _ = back.send(&data).await;
            });
        }
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
