//! A relay lookup against a DHT full of fake provider records (issue 13): a thousand records
//! for the relay key, planted straight into go-like servers ([`go_dht`], which answer every
//! stored provider with its peerstore addresses, as go-libp2p-kad-dht does) next to one
//! honest relay's own announcement. The fakes are silent, lying, list absurd address lists,
//! or list none; together they make one GET_PROVIDERS answer far larger than kad's old
//! 16 KiB limit. The client must still find and verify the honest relay, with a bounded
//! number of dials, at most a couple of them at the IP many records share, and all on
//! loopback. Figures (time to the first verified relay, dials, peak memory) go to stderr:
//! `cargo test -p tokengo --test dht_sybil_go -- --nocapture`.
//!
//! In a file of its own so that the process's peak memory is this test's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod go_dht;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use go_dht::{GoDhtConfig, GoNet};
use libp2p::{Multiaddr, PeerId, StreamProtocol, multiaddr::Protocol};
use libp2p_identity::Keypair;
use tokengo::{
    config::Limits,
    discovery::{
        self, AddressPolicy, Announcer, Answer, DhtConfig, DialGuard, DialRecord, Seek,
        SelectionLimits,
    },
    metrics::DhtMetrics,
    relay::Relay,
    status::{DhtState, DhtStatus},
    transport::{RelayAddr, TransportParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TEST_PROTOCOL: &str = "/tokengo-sybil-go/kad/1.0.0";
const WAIT: Duration = Duration::from_secs(60);
/// One go-clock minute in real time: long enough that nothing the servers hold (records,
/// peerstore addresses) expires during the test.
const MINUTE: Duration = Duration::from_secs(10);
/// Lifetime of the planted records and their addresses.
const PLANTED_TTL: Duration = Duration::from_secs(3600);
/// The IP many silent records share (nothing listens there).
const VICTIM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 66);
/// kad's answer limit before TokenGo raised it to go's 4 MiB.
const OLD_KAD_LIMIT: usize = 16 * 1024;

fn dht(bootstrap: Vec<Multiaddr>) -> DhtConfig {
    DhtConfig {
        bootstrap,
        protocol: StreamProtocol::new(TEST_PROTOCOL),
        policy: AddressPolicy::Loopback,
        timeout: Duration::from_secs(30),
    }
}

fn params() -> TransportParams {
    TransportParams {
        idle_timeout: Duration::from_secs(30),
        max_incoming_streams: 0,
        keep_alive: false,
    }
}

fn relay_key() -> Vec<u8> {
    tokengo_proto::relay_info::provider_key(tokengo_proto::relay_info::RELAY_NAMESPACE)
}

struct AnnouncedRelay {
    addr: RelayAddr,
    status: watch::Receiver<Option<DhtStatus>>,
    stop: CancellationToken,
}

/// A real relay announcing itself on `config`'s DHT.
fn start_relay(config: DhtConfig) -> AnnouncedRelay {
    let identity = Keypair::generate_ed25519();
    let relay = Relay::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity,
        &Limits::default(),
    )
    .unwrap();
    let addr = relay.addr().clone();
    let status_tx = relay.dht_status();
    let status = status_tx.subscribe();
    let metrics = relay.metrics();
    let info = tokengo::relay::relay_info_source(vec![addr.clone()], relay.registry());
    let stop = CancellationToken::new();
    tokio::spawn(relay.run(stop.clone()));
    let announcer = Announcer {
        identity,
        listen: "127.0.0.1:0".parse().unwrap(),
        external_ips: Vec::new(),
        info: Answer::Relay(info),
        status: status_tx,
        metrics: metrics.dht.clone(),
        guard: DialGuard::default(),
    };
    let announce_stop = stop.clone();
    let schedule = discovery::AnnounceSchedule::scaled(MINUTE);
    tokio::spawn(async move {
        discovery::announce_with(&config, announcer, schedule, announce_stop).await
    });
    AnnouncedRelay { addr, status, stop }
}

fn quic(ip: Ipv4Addr, port: u16) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(ip))
        .with(Protocol::Udp(port))
        .with(Protocol::QuicV1)
}

/// UDP ports nothing listens on (bound on all interfaces, then released).
fn closed_udp_ports(n: usize) -> Vec<u16> {
    let sockets: Vec<std::net::UdpSocket> = (0..n)
        .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
        .collect();
    sockets
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect()
}

/// `VmRSS` and `VmHWM` (peak resident set) of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The fake records: `(kind, addresses)`, interleaved so that every part of an answer holds
/// each kind.
fn fakes(
    honest_dht: &[Multiaddr],
    servers: &[Multiaddr],
    silent_ips: &[Ipv4Addr],
) -> Vec<(&'static str, Vec<Multiaddr>)> {
    let ports = closed_udp_ports(64);
    (0..1000usize)
        .map(|i| {
            let port = ports[i % ports.len()];
            match i % 4 {
                // Silent, half of them at the victim's IP.
                0 if i % 8 == 0 => ("silent", vec![quic(VICTIM, port)]),
                0 => (
                    "silent",
                    vec![quic(silent_ips[i / 8 % silent_ips.len()], port)],
                ),
                // Lying: the honest relay's own DHT address, or a go server's, under
                // another PeerId.
                1 if i % 8 == 1 => ("lying", honest_dht.to_vec()),
                1 => (
                    "lying",
                    vec![without_p2p(servers[i / 8 % servers.len()].clone())],
                ),
                // 200 distinct addresses at the victim's and other silent IPs, and the
                // honest relay's.
                2 => (
                    "many addresses",
                    (0..200)
                        .map(|j| match j {
                            0 => honest_dht[0].clone(),
                            _ => {
                                let ip = [VICTIM, silent_ips[0], silent_ips[1], silent_ips[2]];
                                quic(ip[j / ports.len()], ports[j % ports.len()])
                            }
                        })
                        .collect(),
                ),
                _ => ("no address", Vec::new()),
            }
        })
        .collect()
}

fn without_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_fake_providers_do_not_hide_the_honest_relay() {
    // The silent records not at the victim's IP are spread over eight more IPs.
    thousand_fakes((2..=9).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()).await;
}

/// The same with the silent records not at the victim's IP spread over 125 IPs, one each:
/// free for a Sybil on the real DHT (records may name any IP). An IP is chosen at random for
/// each contact, so the contact budget must outlast the silent IPs: with 6 contacts at a
/// time, 48 per discovery and libp2p's 5 s handshake timeout, the first discovery missed the
/// honest relay in 5 runs out of 6; with 16 at a time, 160 per discovery and a seeker's 3 s
/// handshake timeout it must find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_fake_providers_at_125_ips_do_not_hide_the_honest_relay() {
    thousand_fakes((1..=125).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect()).await;
}

/// 1000 fake records (a quarter each silent, lying, with 200 addresses, without any; the
/// silent ones half at [`VICTIM`], half at `silent_ips`) next to one honest relay.
async fn thousand_fakes(silent_ips: Vec<Ipv4Addr>) {
    common::init();
    let net = GoNet::start(&GoDhtConfig::scaled(TEST_PROTOCOL, MINUTE), 3).await;
    let config = dht(net.bootstrap());
    let key = relay_key();
    let mut relay = start_relay(config.clone());
    let honest = relay.addr.peer_id();
    // kad calls a provide done once ADD_PROVIDER is sent: wait until every server answers
    // the record with an address, and until the relay's own check of its announcement ended.
    tokio::time::timeout(WAIT, async {
        while net.stored(&key, &honest) != (3, 3) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the go-like servers did not all store the honest relay's record");
    tokio::time::timeout(
        WAIT,
        relay.status.wait_for(|s| {
            s.as_ref().is_some_and(|s| {
                s.state == DhtState::Announced
                    && s.verification != discovery::Verification::Checking
                    && s.verification != discovery::Verification::NotYet
            })
        }),
    )
    .await
    .expect("the relay never checked its announcement")
    .unwrap();

    // The honest relay's addresses as the DHT answers them.
    let honest_dht = net.servers[0].state.lock().unwrap().addrs_now(&honest);
    assert!(!honest_dht.is_empty());
    let servers = net.bootstrap();
    let fakes = fakes(&honest_dht, &servers, &silent_ips);
    let fakes: Vec<(&str, PeerId, Vec<Multiaddr>)> = fakes
        .into_iter()
        .map(|(kind, addrs)| (kind, PeerId::random(), addrs))
        .collect();
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    // The same records on every server, as a Sybil's ADD_PROVIDER to the closest peers
    // would leave them.
    for server in &net.servers {
        let mut state = server.state.lock().unwrap();
        for (_, peer, addrs) in &fakes {
            state.plant_provider(&key, *peer, addrs.clone(), PLANTED_TTL);
        }
    }
    for (kind, _, _) in &fakes {
        *kinds.entry(kind).or_default() += 1;
    }
    let mut answer_bytes = Vec::new();
    for server in &net.servers {
        let state = server.state.lock().unwrap();
        let providers = state.providers(&key);
        assert_eq!(providers.len(), 1001);
        assert!(providers.contains(&honest));
        answer_bytes.push(state.provider_answer(&key).encode().len());
    }
    for bytes in &answer_bytes {
        // Far over kad's old limit, within go's (and TokenGo's) 4 MiB.
        assert!(*bytes > OLD_KAD_LIMIT, "answer of {bytes} bytes");
        assert!(*bytes < 4 << 20, "answer of {bytes} bytes");
    }
    eprintln!(
        "FIGURES planted 1000 fake providers per server ({kinds:?}); GET_PROVIDERS answers of \
         {answer_bytes:?} bytes (kad's old limit: {OLD_KAD_LIMIT})"
    );

    let server_peers: HashSet<PeerId> = net.servers.iter().map(|s| s.peer_id).collect();
    let limits = SelectionLimits::default();

    // The figures of issue 13: a client that wants one relay.
    let (rss_before, hwm_before) = memory_kib();
    let (found, dials) = seek_relays(&config, 1, Duration::from_millis(200)).await;
    let (rss_after, hwm_after) = memory_kib();
    // The bounds hold whether or not the relay was found.
    let tally = Tally::of(&dials, &server_peers);
    tally.check(&limits, net.servers.len());
    let found = found.unwrap_or_else(|e| {
        panic!("the honest relay was not found among 1000 fake providers: {e}; {tally}")
    });
    assert_eq!(found.relays.len(), 1, "{found:?}");
    assert_eq!(found.relays[0].addr, relay.addr, "{found:?}");
    assert!(found.first_usable <= config.timeout, "{found:?}");
    eprintln!(
        "FIGURES want 1: first verified relay after {:?}; discovery took {:?}; {tally}; \
         providers skipped {}; VmHWM before {hwm_before} KiB, after {hwm_after} KiB (VmRSS \
         before {rss_before} KiB, after {rss_after} KiB)",
        found.first_usable, found.elapsed, found.skipped,
    );

    // A client that wants more relays than there are goes on contacting providers after the
    // honest one until none is left it may contact: the per-IP bounds are reached.
    let (found, dials) = seek_relays(&config, 2, config.timeout).await;
    let found = found.expect("the honest relay was not found among 1000 fake providers");
    assert_eq!(found.relays.len(), 1, "{found:?}");
    assert_eq!(found.relays[0].addr, relay.addr, "{found:?}");
    let tally = Tally::of(&dials, &server_peers);
    tally.check(&limits, net.servers.len());
    eprintln!(
        "FIGURES want 2: first verified relay after {:?}; discovery took {:?}; {tally}; \
         providers skipped {}",
        found.first_usable, found.elapsed, found.skipped,
    );
    relay.stop.cancel();
    net.stop().await;
}

/// Runs one discovery with a fresh identity; every address it dialled, in order.
async fn seek_relays(
    config: &DhtConfig,
    want: usize,
    settle: Duration,
) -> (
    Result<discovery::Discovered, discovery::DiscoveryError>,
    Vec<(Multiaddr, bool)>,
) {
    let record = Arc::new(DialRecord::default());
    let seek = Seek {
        cache: None,
        want,
        settle,
        params: params(),
        guard: DialGuard {
            refused: Default::default(),
            observer: Some(record.observer()),
        },
        metrics: DhtMetrics::default(),
    };
    let found = discovery::discover(config, seek, &CancellationToken::new()).await;
    (found, record.addrs())
}

/// What one discovery dialled. The swarm dials `/p2p/`-suffixed addresses and the
/// verification probe's address names the relay, so every recorded dial names its peer.
struct Tally {
    all: usize,
    /// Dials to the DHT servers (the lookups).
    to_servers: usize,
    /// Dials to providers: the selection's contacts, the verification probe.
    to_providers: usize,
    /// Providers dialled (the honest relay once, for its DHT swarm and its QUIC endpoint).
    providers: HashSet<PeerId>,
    /// Dials to providers per IP.
    per_ip: Vec<(IpAddr, usize)>,
    victim: usize,
}

impl Tally {
    fn of(dials: &[(Multiaddr, bool)], servers: &HashSet<PeerId>) -> Self {
        assert!(!dials.is_empty(), "nothing was dialled at all");
        let mut tally = Self {
            all: dials.len(),
            to_servers: 0,
            to_providers: 0,
            providers: HashSet::new(),
            per_ip: Vec::new(),
            victim: 0,
        };
        let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
        for (addr, _) in dials {
            let ip = discovery::policy::ip_of(addr);
            assert!(
                ip.is_some_and(|ip| ip.is_loopback()),
                "dialled a non-loopback address: {addr}"
            );
            let peer = peer_of(addr).unwrap_or_else(|| panic!("a dial without a PeerId: {addr}"));
            if ip == Some(IpAddr::V4(VICTIM)) {
                tally.victim += 1;
            }
            if servers.contains(&peer) {
                tally.to_servers += 1;
                continue;
            }
            tally.to_providers += 1;
            tally.providers.insert(peer);
            if let Some(ip) = ip {
                *per_ip.entry(ip).or_default() += 1;
            }
        }
        tally.per_ip = per_ip.into_iter().collect();
        tally.per_ip.sort_unstable();
        tally
    }

    fn check(&self, limits: &SelectionLimits, servers: usize) {
        assert!(
            self.providers.len() <= limits.per_discovery,
            "{} providers dialled",
            self.providers.len()
        );
        // Each contact at its first `dial_addrs` addresses, and one verification probe.
        assert!(
            self.to_providers <= limits.per_discovery * limits.dial_addrs + 1,
            "{} dials to providers",
            self.to_providers
        );
        // Every silent record has one address: each dial at a silent IP is a provider
        // contacted there, and nothing answers at those IPs.
        for (ip, dials) in &self.per_ip {
            if *ip != IpAddr::V4(Ipv4Addr::LOCALHOST) {
                assert!(
                    *dials <= limits.failures_per_ip,
                    "{dials} dials to {ip}: {:?}",
                    self.per_ip
                );
            }
        }
        assert!(
            self.victim <= limits.failures_per_ip,
            "{} dials to the victim's IP",
            self.victim
        );
        // The lookups reuse their connection to each server.
        assert!(
            self.to_servers <= 2 * servers,
            "{} dials to {servers} DHT servers",
            self.to_servers
        );
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dials made {} ({} to the DHT servers, {} to {} providers; per provider IP {:?}); \
             victim-IP attempts {}",
            self.all,
            self.to_servers,
            self.to_providers,
            self.providers.len(),
            self.per_ip,
            self.victim
        )
    }
}
