//! `udp-link`: a user-space UDP link for the fault suite (`bench/faults`), which joins two
//! network namespaces and adds delay, random loss and reordering in both directions, because
//! the kernel `bench/faults` runs on has no `tc netem`.
//!
//! It listens on one address and forwards every datagram to one target. Each distinct sender
//! gets its own upstream socket (a flow, kept for the process's life), so the target sees one
//! source port per sender and its answers go back to the right sender, like a NAT. Which
//! packets are dropped or delayed is decided by [`LinkPolicy`], which does no I/O.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use tokio::{
    net::UdpSocket,
    sync::mpsc,
    time::{Instant, sleep_until},
};

/// Largest datagram forwarded (QUIC's are at most 1,500 bytes on these links; IPv4's limit).
const MAX_DATAGRAM: usize = 65_535;

/// Why a link cannot be set up as asked.
#[derive(Debug, PartialEq)]
pub(crate) enum LinkError {
    /// A probability (`--loss`, `--reorder`) outside 0..=1 or not a number.
    Probability {
        /// The flag.
        name: &'static str,
        /// What was given.
        value: f64,
    },
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Probability { name, value } => {
                write!(
                    f,
                    "--{name} must be a probability between 0 and 1, got {value}"
                )
            }
        }
    }
}

impl std::error::Error for LinkError {}

/// What happens to one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Lost.
    Drop,
    /// Sent in order after this delay.
    InOrder(Duration),
    /// Sent after this longer delay, so later datagrams overtake it.
    Reordered(Duration),
}

/// The faults of one direction of a link, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LinkPolicy {
    /// One-way delay of every datagram (default 0).
    delay: Duration,
    /// Probability that a datagram is lost (default 0).
    loss: f64,
    /// Probability that a datagram is held back by `reorder_extra` (default 0).
    reorder: f64,
    /// How much longer a reordered datagram waits (default: the delay, at least 5 ms).
    reorder_extra: Duration,
}

impl LinkPolicy {
    /// A policy from the flags' values; probabilities must lie in 0..=1.
    pub(crate) fn new(
        delay: Duration,
        loss: f64,
        reorder: f64,
        reorder_extra: Option<Duration>,
    ) -> Result<Self, LinkError> {
        for (name, value) in [("loss", loss), ("reorder", reorder)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(LinkError::Probability { name, value });
            }
        }
        Ok(Self {
            delay,
            loss,
            reorder,
            reorder_extra: reorder_extra.unwrap_or(delay.max(Duration::from_millis(5))),
        })
    }

    /// The fate of the next datagram, drawing from `random`.
    pub(crate) fn verdict(&self, random: &mut SplitMix64) -> Verdict {
        if self.loss > 0.0 && random.unit() < self.loss {
            Verdict::Drop
        } else if self.reorder > 0.0 && random.unit() < self.reorder {
            Verdict::Reordered(self.delay + self.reorder_extra)
        } else {
            Verdict::InOrder(self.delay)
        }
    }
}

/// SplitMix64: a small, seedable generator. Not cryptographic: it only picks which test
/// datagrams a fault hits, and a seed makes a run repeatable.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    #[must_use]
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        // The top 53 bits make an exactly representable fraction.
        #[allow(clippy::cast_precision_loss)]
        let fraction = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        fraction
    }
}

/// Datagram counts of a running link, both directions together.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    reordered: AtomicU64,
}

impl Counters {
    /// `{"forwarded":N,"dropped":N,"reordered":N}`.
    #[must_use]
    pub(crate) fn json(&self) -> String {
        format!(
            "{{\"forwarded\":{},\"dropped\":{},\"reordered\":{}}}",
            self.forwarded.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.reordered.load(Ordering::Relaxed)
        )
    }
}

/// Where a direction's datagrams go.
#[derive(Debug, Clone)]
enum Target {
    /// The upstream socket, connected to the link's target.
    Upstream(Arc<UdpSocket>),
    /// Back to a sender through the listening socket.
    Sender(Arc<UdpSocket>, SocketAddr),
}

impl Target {
    async fn send(&self, data: &[u8]) {
        // A send error (buffer full, target gone) is a lost datagram, as on a wire.
        let _ = match self {
            Self::Upstream(socket) => socket.send(data).await,
            Self::Sender(socket, to) => socket.send_to(data, *to).await,
        };
    }
}

/// One direction of one flow: applies the policy and sends in order after the delay.
#[derive(Debug, Clone)]
struct Direction {
    policy: LinkPolicy,
    target: Target,
    queue: mpsc::UnboundedSender<(Instant, Bytes)>,
    counters: Arc<Counters>,
}

impl Direction {
    fn spawn(policy: LinkPolicy, target: Target, counters: Arc<Counters>) -> Self {
        let (queue, mut due) = mpsc::unbounded_channel::<(Instant, Bytes)>();
        let sender = target.clone();
        // Deadlines enter this queue in order (one fixed delay), so one task sending each when
        // due keeps their order.
        tokio::spawn(async move {
            while let Some((at, data)) = due.recv().await {
                sleep_until(at).await;
                sender.send(&data).await;
            }
        });
        Self {
            policy,
            target,
            queue,
            counters,
        }
    }

    fn pass(&self, data: Bytes, random: &mut SplitMix64) {
        match self.policy.verdict(random) {
            Verdict::Drop => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::InOrder(delay) => {
                self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                let _ = self.queue.send((Instant::now() + delay, data));
            }
            Verdict::Reordered(delay) => {
                self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                self.counters.reordered.fetch_add(1, Ordering::Relaxed);
                let target = self.target.clone();
                tokio::spawn(async move {
                    sleep_until(Instant::now() + delay).await;
                    target.send(&data).await;
                });
            }
        }
    }
}

/// A bound link, ready to run.
#[derive(Debug)]
pub(crate) struct Link {
    front: Arc<UdpSocket>,
    to: SocketAddr,
    policy: LinkPolicy,
    seed: u64,
    counters: Arc<Counters>,
}

impl Link {
    /// Binds the listening socket.
    pub(crate) async fn bind(
        listen: SocketAddr,
        to: SocketAddr,
        policy: LinkPolicy,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let front = UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        Ok(Self {
            front: Arc::new(front),
            to,
            policy,
            seed,
            counters: Arc::default(),
        })
    }

    /// The address it listens on.
    pub(crate) fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.front.local_addr()?)
    }

    /// Its datagram counts.
    #[must_use]
    pub(crate) fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Forwards until the task is dropped or the listening socket fails.
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let mut random = SplitMix64::new(self.seed);
        let mut flows: HashMap<SocketAddr, Direction> = HashMap::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (len, from) = self
                .front
                .recv_from(&mut buf)
                .await
                .context("receiving on the listening socket")?;
            let data = Bytes::copy_from_slice(&buf[..len]);
            let upstream = match flows.get(&from) {
                Some(direction) => direction.clone(),
                None => {
                    let direction = self.open_flow(from, random.next_u64()).await?;
                    flows.insert(from, direction.clone());
                    direction
                }
            };
            upstream.pass(data, &mut random);
        }
    }

    /// A new sender: an upstream socket of its own, and a task carrying the answers back.
    async fn open_flow(&self, from: SocketAddr, seed: u64) -> anyhow::Result<Direction> {
        let bind: SocketAddr = if self.to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)
            .await
            .context("binding a flow socket")?;
        socket
            .connect(self.to)
            .await
            .with_context(|| format!("connecting a flow socket to {}", self.to))?;
        let socket = Arc::new(socket);
        let back = Direction::spawn(
            self.policy,
            Target::Sender(Arc::clone(&self.front), from),
            Arc::clone(&self.counters),
        );
        let reader = Arc::clone(&socket);
        tokio::spawn(async move {
            let mut random = SplitMix64::new(seed);
            let mut buf = vec![0u8; MAX_DATAGRAM];
            // An error here (ICMP unreachable while the target restarts) is not the end of
            // the flow: the target may come back on the same address.
            loop {
                if let Ok(len) = reader.recv(&mut buf).await {
                    back.pass(Bytes::copy_from_slice(&buf[..len]), &mut random);
                }
            }
        });
        Ok(Direction::spawn(
            self.policy,
            Target::Upstream(socket),
            Arc::clone(&self.counters),
        ))
    }
}

/// `tokengo-bench udp-link`: prints `udp-link listening on ADDR -> TO`, forwards until
/// SIGTERM or SIGINT, then prints its counts as one JSON line.
pub(crate) async fn run(
    listen: SocketAddr,
    to: SocketAddr,
    policy: LinkPolicy,
    seed: u64,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let link = Link::bind(listen, to, policy, seed).await?;
    println!("udp-link listening on {} -> {to}", link.local_addr()?);
    let counters = link.counters();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        result = link.run() => result?,
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    println!("{}", counters.json());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn policy(delay_ms: u64, loss: f64, reorder: f64) -> LinkPolicy {
        LinkPolicy::new(Duration::from_millis(delay_ms), loss, reorder, None).unwrap()
    }

    fn count(policy: &LinkPolicy, draws: usize, seed: u64) -> (usize, usize, usize) {
        let mut random = SplitMix64::new(seed);
        let (mut dropped, mut in_order, mut reordered) = (0, 0, 0);
        for _ in 0..draws {
            match policy.verdict(&mut random) {
                Verdict::Drop => dropped += 1,
                Verdict::InOrder(_) => in_order += 1,
                Verdict::Reordered(_) => reordered += 1,
            }
        }
        (dropped, in_order, reordered)
    }

    #[test]
    fn no_faults_forwards_everything_after_the_delay() {
        let p = policy(50, 0.0, 0.0);
        assert_eq!(count(&p, 10_000, 1), (0, 10_000, 0));
        assert_eq!(
            p.verdict(&mut SplitMix64::new(2)),
            Verdict::InOrder(Duration::from_millis(50))
        );
    }

    #[test]
    fn full_loss_drops_everything() {
        assert_eq!(count(&policy(0, 1.0, 0.0), 10_000, 3), (10_000, 0, 0));
    }

    #[test]
    fn five_percent_loss_drops_about_one_in_twenty() {
        let (dropped, in_order, _) = count(&policy(0, 0.05, 0.0), 100_000, 4);
        assert!((4_500..=5_500).contains(&dropped), "{dropped} dropped");
        assert_eq!(dropped + in_order, 100_000);
    }

    #[test]
    fn reordered_datagrams_wait_longer() {
        let p = policy(20, 0.0, 1.0);
        assert_eq!(
            p.verdict(&mut SplitMix64::new(5)),
            Verdict::Reordered(Duration::from_millis(40))
        );
        let (_, in_order, reordered) = count(&policy(20, 0.0, 0.1), 100_000, 6);
        assert!(
            (9_000..=11_000).contains(&reordered),
            "{reordered} reordered"
        );
        assert_eq!(in_order + reordered, 100_000);
    }

    #[test]
    fn probabilities_outside_zero_to_one_are_refused() {
        for (loss, reorder) in [(1.5, 0.0), (-0.1, 0.0), (f64::NAN, 0.0), (0.0, 2.0)] {
            assert!(LinkPolicy::new(Duration::ZERO, loss, reorder, None).is_err());
        }
    }

    /// An echo server on loopback; returns its address.
    async fn echo() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                // Answer with the sender's port, so a test sees which flow carried it.
                let mut answer = buf[..len].to_vec();
                answer.extend_from_slice(&from.port().to_be_bytes());
                socket.send_to(&answer, from).await.unwrap();
            }
        });
        addr
    }

    async fn start_link(policy: LinkPolicy) -> SocketAddr {
        let link = Link::bind("127.0.0.1:0".parse().unwrap(), echo().await, policy, 7)
            .await
            .unwrap();
        let addr = link.local_addr().unwrap();
        tokio::spawn(link.run());
        addr
    }

    async fn receive(socket: &UdpSocket) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let len = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
            .await
            .expect("no answer through the link within 10 s")
            .unwrap();
        buf.truncate(len);
        buf
    }

    #[tokio::test]
    async fn datagrams_cross_both_ways_in_order_and_at_least_the_delay_late() {
        let delay = Duration::from_millis(20);
        let link = start_link(LinkPolicy::new(delay, 0.0, 0.0, None).unwrap()).await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(link).await.unwrap();
        let sent = Instant::now();
        for n in 0u8..20 {
            socket.send(&[n; 100]).await.unwrap();
        }
        for n in 0u8..20 {
            let answer = receive(&socket).await;
            assert_eq!(
                answer[..100],
                [n; 100],
                "datagram {n} out of order or altered"
            );
        }
        // Each datagram crossed the link twice (there and back).
        assert!(sent.elapsed() >= 2 * delay, "the delay was not applied");
    }

    #[tokio::test]
    async fn each_sender_gets_its_own_flow_and_only_its_answers() {
        let link = start_link(policy(0, 0.0, 0.0)).await;
        let (a, b) = (
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        );
        a.connect(link).await.unwrap();
        b.connect(link).await.unwrap();
        a.send(b"from a").await.unwrap();
        let answer_a = receive(&a).await;
        b.send(b"from b").await.unwrap();
        let answer_b = receive(&b).await;
        assert_eq!(&answer_a[..6], b"from a");
        assert_eq!(&answer_b[..6], b"from b");
        // The echo server saw two different source ports: two flows.
        assert_ne!(answer_a[6..], answer_b[6..]);
    }

    #[tokio::test]
    async fn a_lossy_link_loses_what_the_policy_drops() {
        let link = Link::bind(
            "127.0.0.1:0".parse().unwrap(),
            echo().await,
            policy(0, 1.0, 0.0),
            7,
        )
        .await
        .unwrap();
        let addr = link.local_addr().unwrap();
        let counters = link.counters();
        tokio::spawn(link.run());
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(addr).await.unwrap();
        socket.send(b"lost").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while counters.dropped.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "the link never handled the datagram"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(counters.forwarded.load(Ordering::Relaxed), 0);
        let mut buf = [0u8; 16];
        assert!(
            socket.try_recv(&mut buf).is_err(),
            "a datagram crossed a link with 100 % loss"
        );
    }
}
