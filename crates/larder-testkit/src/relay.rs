//! A TCP relay for putting a dependency (the S3 server) "far away" or "down" as larderd sees it,
//! without disturbing the real server other tests share: it can be switched off (connections
//! refused, open ones cut) and on again, and can throttle what flows back to the client to a
//! total rate shared by all its connections (a slow link to S3 makes fills take seconds, so
//! that races with them can be staged without guessing at timing).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

pub struct TcpRelay {
    /// `127.0.0.1:PORT` the relay listens on.
    pub addr: String,
    upstream: String,
    bytes_per_sec: Option<u64>,
    /// Whether client→upstream bytes are paced too (uploads to S3), sharing the one rate.
    pace_uploads: bool,
    /// Upstream→client bytes relayed so far, all connections together.
    down: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TcpRelay {
    /// Starts relaying to `upstream` (`host:port`); with `bytes_per_sec`, upstream→client bytes
    /// of all connections together flow at that rate at most.
    pub async fn start(upstream: &str, bytes_per_sec: Option<u64>) -> TcpRelay {
        TcpRelay::start_paced(upstream, bytes_per_sec, false).await
    }

    /// Like [`TcpRelay::start`], with bytes in both directions sharing the rate: uploads to S3
    /// take seconds too (a generator's snapshot upload can be interrupted mid-way).
    pub async fn start_both_ways(upstream: &str, bytes_per_sec: u64) -> TcpRelay {
        TcpRelay::start_paced(upstream, Some(bytes_per_sec), true).await
    }

    async fn start_paced(
        upstream: &str,
        bytes_per_sec: Option<u64>,
        pace_uploads: bool,
    ) -> TcpRelay {
        // The first listener is kept, not probed and dropped: another test binding port 0 at
        // the same moment could take the port in between.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut relay = TcpRelay {
            addr,
            upstream: upstream.to_string(),
            bytes_per_sec,
            pace_uploads,
            down: Arc::default(),
            task: None,
        };
        relay.serve(listener);
        relay
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes relayed from the upstream to clients so far (what larderd has received from S3):
    /// counted as they pass on a throttled relay, when the connection closes on an unthrottled
    /// one.
    pub fn bytes_down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    /// Accepts and relays connections again, on the same address, after [`TcpRelay::off`].
    pub async fn on(&mut self) {
        let listener = TcpListener::bind(&self.addr).await.unwrap();
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let pace = self.bytes_per_sec.map(|rate| Arc::new(Pacer::new(rate)));
        let pace_uploads = self.pace_uploads;
        let down = self.down.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let upstream = upstream.clone();
                let pace = pace.clone();
                let down = down.clone();
                conns.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    match pace {
                        None => {
                            let (mut client, mut server) = (client, server);
                            if let Ok((_, from_server)) =
                                tokio::io::copy_bidirectional(&mut client, &mut server).await
                            {
                                down.fetch_add(from_server, Ordering::Relaxed);
                            }
                        }
                        Some(pace) => {
                            let (mut client_rx, mut client_tx) = client.into_split();
                            let (mut server_rx, mut server_tx) = server.into_split();
                            let up_pace = pace_uploads.then(|| pace.clone());
                            let up = paced_copy(&mut client_rx, &mut server_tx, up_pace, None);
                            let down =
                                paced_copy(&mut server_rx, &mut client_tx, Some(pace), Some(down));
                            let _ = tokio::join!(up, down);
                        }
                    }
                });
            }
        }));
    }

    /// Refuses new connections and cuts the open ones.
    pub fn off(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort(); // drops the listener and, with the JoinSet, every relayed connection
        }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.off();
    }
}

/// Copies `rx` to `tx` until the end, each chunk waiting for its slot of `pace` (if any) and
/// counted in `count` once written, then shuts `tx` down.
async fn paced_copy(
    rx: &mut tokio::net::tcp::OwnedReadHalf,
    tx: &mut tokio::net::tcp::OwnedWriteHalf,
    pace: Option<Arc<Pacer>>,
    count: Option<Arc<AtomicU64>>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = rx.read(&mut buf).await?;
        if n == 0 {
            return tx.shutdown().await;
        }
        if let Some(pace) = &pace {
            pace.take(n).await;
        }
        tx.write_all(&buf[..n]).await?;
        if let Some(count) = &count {
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Hands out send slots at a fixed byte rate, shared by all connections.
struct Pacer {
    rate: u64,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer {
            rate: rate.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn take(&self, bytes: usize) {
        let at = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start
        };
        tokio::time::sleep_until(at.into()).await;
    }
}
