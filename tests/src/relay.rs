//! A test-only UDP relay on loopback that injects network faults between QUIC peers.
//!
//! The relay owns one front socket that clients (agents) dial instead of the server, and one
//! upstream socket per client address, connected to the server. Every datagram, in both
//! directions, passes through [`Faults`], which the test changes while traffic flows:
//! random loss, loss bursts (the next N datagrams), delay with jitter, duplication, reordering
//! (a datagram held back behind later ones) and partitions (everything dropped until a deadline).
//!
//! Invariants:
//! - The relay never alters a datagram's bytes; it only drops, delays or repeats it.
//! - Randomness comes from a seeded generator, so a failing run can be replayed with its seed.
//! - It runs on its own thread and runtime; dropping the [`Relay`] stops it and frees its ports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

/// The largest datagram the relay forwards (larger than any QUIC packet on loopback).
const MAX_DATAGRAM: usize = 65_535;

/// What happens to datagrams right now. Probabilities are 0.0..=1.0 per datagram.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Chance that a datagram is dropped.
    pub drop_prob: f64,
    /// Fixed delay added to every datagram.
    pub delay: Duration,
    /// Extra random delay, 0..jitter, per datagram (reorders datagrams closer than this).
    pub jitter: Duration,
    /// Chance that a datagram is sent twice.
    pub duplicate_prob: f64,
    /// Chance that a datagram is held back by `reorder_hold`, so later ones overtake it.
    pub reorder_prob: f64,
    /// How long a reordered datagram is held.
    pub reorder_hold: Duration,
}

/// Counters of what the relay did, both directions together.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Datagrams received from either side.
    pub received: AtomicU64,
    /// Datagrams sent on (duplicates included).
    pub forwarded: AtomicU64,
    /// Datagrams dropped (random loss, bursts and partitions).
    pub dropped: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Datagrams held back so that later ones overtook them.
    pub reordered: AtomicU64,
}

impl RelayStats {
    /// A one-line summary for logs and reports.
    pub fn summary(&self) -> String {
        format!(
            "received={} forwarded={} dropped={} duplicated={} reordered={}",
            self.received.load(Ordering::Relaxed),
            self.forwarded.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.duplicated.load(Ordering::Relaxed),
            self.reordered.load(Ordering::Relaxed),
        )
    }
}

/// The fault state shared by the test and the relay's tasks.
#[derive(Debug)]
struct Control {
    faults: Faults,
    /// Datagrams still to drop in the current burst.
    burst_left: u64,
    /// Everything is dropped until then.
    partition_until: Option<Instant>,
    rng: XorShift,
}

/// A running relay. Clients dial [`Relay::addr`]; the relay forwards to the server address.
#[derive(Debug)]
pub struct Relay {
    /// The address clients dial.
    pub addr: SocketAddr,
    /// What the relay has done so far.
    pub stats: Arc<RelayStats>,
    control: Arc<Mutex<Control>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on `127.0.0.1:0` forwarding to `server`, with no faults and the
    /// randomness seeded by `seed`.
    pub fn start(server: SocketAddr, seed: u64) -> anyhow::Result<Self> {
        let front = std::net::UdpSocket::bind("127.0.0.1:0")?;
        front.set_nonblocking(true)?;
        let addr = front.local_addr()?;
        let control = Arc::new(Mutex::new(Control {
            faults: Faults::default(),
            burst_left: 0,
            partition_until: None,
            rng: XorShift::new(seed),
        }));
        let stats = Arc::new(RelayStats::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (c, s) = (control.clone(), stats.clone());
        let thread = std::thread::Builder::new().name("relay".into()).spawn(move || {
            rt.block_on(async move {
                let front = match UdpSocket::from_std(front) {
                    Ok(f) => Arc::new(f),
                    Err(e) => {
                        eprintln!("relay: front socket: {e}");
                        return;
                    }
                };
                tokio::select! {
                    r = serve(front, server, c, s) => {
                        if let Err(e) = r {
                            eprintln!("relay stopped: {e:#}");
                        }
                    }
                    _ = stopped => {}
                }
            });
        })?;
        Ok(Self { addr, stats, control, stop: Some(stop), thread: Some(thread) })
    }

    /// Replaces the steady fault settings.
    pub fn set(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Removes every fault: no loss, delay, duplication, reordering, burst or partition.
    pub fn heal(&self) {
        let mut c = self.lock();
        c.faults = Faults::default();
        c.burst_left = 0;
        c.partition_until = None;
    }

    /// Drops the next `datagrams` datagrams (either direction), on top of the steady faults.
    pub fn burst(&self, datagrams: u64) {
        self.lock().burst_left += datagrams;
    }

    /// Drops everything, both directions, for `duration` from now.
    pub fn partition(&self, duration: Duration) {
        self.lock().partition_until = Some(Instant::now() + duration);
    }

    /// Whether a partition is in force now.
    pub fn partitioned(&self) -> bool {
        self.lock().partition_until.is_some_and(|t| Instant::now() < t)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What to do with one datagram.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Drop,
    /// Send after this delay, this many times (1 or 2), and whether it was held back.
    Send {
        after: Duration,
        copies: u8,
        held: bool,
    },
}

impl Control {
    fn judge(&mut self, now: Instant) -> Verdict {
        if self.partition_until.is_some_and(|t| now < t) {
            return Verdict::Drop;
        }
        if self.burst_left > 0 {
            self.burst_left -= 1;
            return Verdict::Drop;
        }
        let f = &self.faults;
        let (drop_p, dup_p, reorder_p) = (f.drop_prob, f.duplicate_prob, f.reorder_prob);
        let (delay, jitter, hold) = (f.delay, f.jitter, f.reorder_hold);
        if self.rng.chance(drop_p) {
            return Verdict::Drop;
        }
        let mut after = delay + jitter.mul_f64(self.rng.unit());
        let held = self.rng.chance(reorder_p);
        if held {
            after += hold;
        }
        let copies = if self.rng.chance(dup_p) { 2 } else { 1 };
        Verdict::Send { after, copies, held }
    }
}

/// Accepts datagrams from clients on `front`, giving each client its own upstream socket.
async fn serve(
    front: Arc<UdpSocket>,
    server: SocketAddr,
    control: Arc<Mutex<Control>>,
    stats: Arc<RelayStats>,
) -> anyhow::Result<()> {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = front.recv_from(&mut buf).await?;
        let upstream = match upstreams.get(&client) {
            Some(u) => u.clone(),
            None => {
                let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
                u.connect(server).await?;
                tokio::spawn(downstream(
                    u.clone(),
                    front.clone(),
                    client,
                    control.clone(),
                    stats.clone(),
                ));
                upstreams.insert(client, u.clone());
                u
            }
        };
        let datagram = buf[..n].to_vec();
        forward(&control, &stats, datagram, move |d| {
            let upstream = upstream.clone();
            async move { upstream.send(&d).await.map(drop) }
        });
    }
}

/// Carries the server's datagrams for one client back through the front socket.
async fn downstream(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    control: Arc<Mutex<Control>>,
    stats: Arc<RelayStats>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // A send to a closed server port makes the next recv fail (ICMP); keep going, the server
    // may come back on the same port.
    loop {
        let n = match upstream.recv(&mut buf).await {
            Ok(n) => n,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let front = front.clone();
        forward(&control, &stats, buf[..n].to_vec(), move |d| {
            let front = front.clone();
            async move { front.send_to(&d, client).await.map(drop) }
        });
    }
}

/// Applies the faults to one datagram and schedules its sends.
fn forward<F, Fut>(control: &Mutex<Control>, stats: &Arc<RelayStats>, datagram: Vec<u8>, send: F)
where
    F: Fn(Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send,
{
    stats.received.fetch_add(1, Ordering::Relaxed);
    let verdict = control.lock().unwrap_or_else(PoisonError::into_inner).judge(Instant::now());
    let Verdict::Send { after, copies, held } = verdict else {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if held {
        stats.reordered.fetch_add(1, Ordering::Relaxed);
    }
    if copies > 1 {
        stats.duplicated.fetch_add(u64::from(copies - 1), Ordering::Relaxed);
    }
    let stats = stats.clone();
    let go = async move {
        for _ in 0..copies {
            // A failed send is a lost datagram, which is what QUIC expects of a network.
            if send(datagram.clone()).await.is_ok() {
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    if after.is_zero() {
        tokio::spawn(go);
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            go.await;
        });
    }
}

/// A small seeded generator (xorshift64*): enough for fault injection, no dependency.
#[derive(Debug, Clone)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in 0.0..1.0.
    fn unit(&mut self) -> f64 {
        // The top 53 bits fit an f64 mantissa exactly.
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP echo server on loopback; returns its address.
    async fn echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    /// Sends `n` numbered datagrams through the relay and collects the echoes for `wait`.
    async fn round_trip(relay: &Relay, n: u32, wait: Duration) -> Vec<u32> {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(relay.addr).await.unwrap();
        for i in 0..n {
            c.send(&i.to_be_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        let end = tokio::time::Instant::now() + wait;
        while let Ok(Ok(len)) = tokio::time::timeout_at(end, c.recv(&mut buf)).await {
            got.push(u32::from_be_bytes(buf[..len].try_into().unwrap()));
        }
        got
    }

    #[tokio::test]
    async fn clean_relay_forwards_everything_in_order() {
        let relay = Relay::start(echo().await, 1).unwrap();
        let got = round_trip(&relay, 50, Duration::from_millis(500)).await;
        assert_eq!(got, (0..50).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn faults_drop_duplicate_reorder_and_partition() {
        let relay = Relay::start(echo().await, 7).unwrap();
        relay.set(Faults {
            drop_prob: 0.2,
            duplicate_prob: 0.2,
            reorder_prob: 0.2,
            reorder_hold: Duration::from_millis(20),
            ..Faults::default()
        });
        let got = round_trip(&relay, 200, Duration::from_millis(800)).await;
        let mut unique = got.clone();
        unique.sort_unstable();
        unique.dedup();
        assert!(unique.len() < 200, "some were lost: {}", relay.stats.summary());
        assert!(got.len() > unique.len(), "some were duplicated: {}", relay.stats.summary());
        assert!(got.windows(2).any(|w| w[0] > w[1]), "some were reordered");

        relay.heal();
        relay.burst(10);
        let got = round_trip(&relay, 20, Duration::from_millis(300)).await;
        // The first 10 judged are the first 10 sent (nothing echoes before one gets through).
        assert_eq!(got, (10..20).collect::<Vec<_>>(), "{}", relay.stats.summary());

        relay.partition(Duration::from_millis(300));
        assert!(relay.partitioned());
        assert!(round_trip(&relay, 10, Duration::from_millis(100)).await.is_empty());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(round_trip(&relay, 10, Duration::from_millis(300)).await.len(), 10);
    }
}
