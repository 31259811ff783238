//! Relay lookups against DHTs full of records: many honest relays on `tokengo bootstrap`
//! servers, and a thousand fake providers (real libp2p identities with their own records:
//! silent, lying, with absurd address lists, together far over kad's old 16 KiB answer limit)
//! on servers that store and return every record the way go-libp2p-kad-dht servers do. All on
//! loopback with a test protocol name; the client's own dials are recorded and must stay on
//! loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{StreamExt as _, stream};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm,
    kad::{
        self,
        store::{MemoryStore, MemoryStoreConfig, RecordStore as _},
    },
    multiaddr::Protocol,
    swarm::SwarmEvent,
};
use libp2p_identity::Keypair;
use tokengo::{
    config::Limits,
    discovery::{
        self, AddressPolicy, Announcer, Answer, DhtConfig, DhtServer, DialGuard, DialRecord, Seek,
    },
    metrics::DhtMetrics,
    relay::Relay,
    status::{DhtState, DhtStatus},
    transport::{RelayAddr, TransportParams},
};
use tokengo_proto::relay_info;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TEST_PROTOCOL: &str = "/tokengo-sybil/kad/1.0.0";
const WAIT: Duration = Duration::from_secs(60);

fn config(bootstrap: &[Multiaddr]) -> DhtConfig {
    DhtConfig {
        bootstrap: bootstrap.to_vec(),
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

/// A seeker whose every dial is recorded in `record`.
fn seek(record: &Arc<DialRecord>, want: usize, settle: Duration) -> Seek {
    Seek {
        cache: None,
        want,
        settle,
        params: params(),
        guard: DialGuard {
            refused: Default::default(),
            observer: Some(record.observer()),
        },
        metrics: DhtMetrics::default(),
    }
}

/// A real relay announcing itself on the DHT of `config`.
struct AnnouncedRelay {
    addr: RelayAddr,
    status: watch::Receiver<Option<DhtStatus>>,
    stop: CancellationToken,
}

async fn start_relay(config: &DhtConfig) -> AnnouncedRelay {
    let identity = Keypair::generate_ed25519();
    let relay = Relay::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity,
        &Limits::default(),
    )
    .unwrap();
    let addr = relay.addr().clone();
    let status_tx = relay.dht_status();
    let mut status = status_tx.subscribe();
    let info = discovery::relay_info_source(vec![addr.clone()], relay.registry());
    let metrics = relay.metrics();
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
    let config = config.clone();
    tokio::spawn(async move { discovery::announce(&config, announcer, announce_stop).await });
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.as_ref().is_some_and(|s| s.state == DhtState::Announced)),
    )
    .await
    .expect("relay never announced")
    .unwrap();
    AnnouncedRelay { addr, status, stop }
}

/// `tokengo bootstrap` servers (the real DHT server), each bootstrapping from the earlier ones.
async fn start_bootstrap_servers(n: usize) -> (Vec<Multiaddr>, Vec<CancellationToken>) {
    let mut bootstrap = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..n {
        let server = DhtServer::start(
            &config(&bootstrap),
            Keypair::generate_ed25519(),
            "127.0.0.1:0".parse().unwrap(),
            &[],
            DialGuard::default(),
        )
        .await
        .unwrap();
        bootstrap.extend(server.addrs().to_vec());
        let stop = CancellationToken::new();
        tokio::spawn(server.run(stop.clone()));
        stops.push(stop);
    }
    (bootstrap, stops)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_five_relays_on_a_private_dht_are_all_findable() {
    common::init();
    let (bootstrap, server_stops) = start_bootstrap_servers(3).await;
    let config = config(&bootstrap);
    // One after the other, so every server sees the same order (kad's store used to keep the
    // first 20 per key).
    let mut relays = Vec::new();
    for _ in 0..25 {
        relays.push(start_relay(&config).await);
    }
    let record = Arc::new(DialRecord::default());
    let found = discovery::discover(
        &config,
        seek(&record, 25, Duration::from_secs(30)),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut found: Vec<RelayAddr> = found.relays.into_iter().map(|r| r.addr).collect();
    let mut announced: Vec<RelayAddr> = relays.iter().map(|r| r.addr.clone()).collect();
    found.sort_by_key(ToString::to_string);
    announced.sort_by_key(ToString::to_string);
    assert_eq!(found, announced);
    assert_loopback(&record);
    for relay in relays {
        relay.stop.cancel();
    }
    for stop in server_stops {
        stop.cancel();
    }
}

// ------------------------------------------------------------------------- go-like servers

/// A kad server that stores every provider record it is given, addresses and all, and
/// returns all of them in one answer: what go-libp2p-kad-dht servers (the public DHT) do.
fn storing_server() -> Swarm<kad::Behaviour<MemoryStore>> {
    let store_config = MemoryStoreConfig {
        max_providers_per_key: 100_000,
        ..MemoryStoreConfig::default()
    };
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut config = kad::Config::new(StreamProtocol::new(TEST_PROTOCOL));
            // Accepts the long ADD_PROVIDER messages of records with absurd address lists.
            config.set_max_packet_size(4 * 1024 * 1024);
            let mut kad = kad::Behaviour::with_config(
                peer,
                MemoryStore::with_config(peer, store_config),
                config,
            );
            kad.set_mode(Some(kad::Mode::Server));
            kad
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm
        .listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
        .unwrap();
    swarm
}

/// Who stored providers of the relay key, per storing server.
type Stored = Arc<Mutex<HashSet<PeerId>>>;

fn relay_key() -> kad::RecordKey {
    kad::RecordKey::new(&relay_info::provider_key(relay_info::RELAY_NAMESPACE))
}

async fn start_storing_servers(n: usize) -> (Vec<Multiaddr>, Vec<Stored>, Vec<CancellationToken>) {
    let mut bootstrap = Vec::new();
    let mut stored = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..n {
        let mut swarm = storing_server();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        bootstrap.push(addr.with(Protocol::P2p(*swarm.local_peer_id())));
        let providers = Stored::default();
        stored.push(Arc::clone(&providers));
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = until.cancelled() => break,
                    event = swarm.select_next_some() => event,
                };
                if let SwarmEvent::Behaviour(kad::Event::InboundRequest {
                    request: kad::InboundRequest::AddProvider { .. },
                }) = event
                {
                    let now: HashSet<PeerId> = swarm
                        .behaviour_mut()
                        .store_mut()
                        .providers(&relay_key())
                        .into_iter()
                        .map(|r| r.provider)
                        .collect();
                    *providers.lock().unwrap() = now;
                }
            }
        });
        stops.push(stop);
    }
    (bootstrap, stored, stops)
}

/// Puts a provider record for the relay key on every server, under a fresh identity and
/// listing `addrs`; returns once every server stored it.
async fn register_fake(bootstrap: &[Multiaddr], stored: &[Stored], addrs: Vec<Multiaddr>) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let config = kad::Config::new(StreamProtocol::new(TEST_PROTOCOL));
            let mut kad = kad::Behaviour::with_config(peer, MemoryStore::new(peer), config);
            kad.set_mode(Some(kad::Mode::Client));
            kad
        })
        .unwrap()
        .build();
    for server in bootstrap {
        let mut base = server.clone();
        let Some(Protocol::P2p(peer)) = base.pop() else {
            panic!("bootstrap address without /p2p/")
        };
        swarm.behaviour_mut().add_address(&peer, base);
    }
    for addr in addrs {
        swarm.add_external_address(addr);
    }
    let me = *swarm.local_peer_id();
    swarm.behaviour_mut().start_providing(relay_key()).unwrap();
    // kad reports a provide done when the ADD_PROVIDER messages are queued: keep the swarm
    // running until every server holds the record.
    let everywhere = || stored.iter().all(|s| s.lock().unwrap().contains(&me));
    tokio::time::timeout(WAIT, async {
        while !everywhere() {
            tokio::select! {
                _ = swarm.select_next_some() => {}
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
    .await
    .expect("a fake provider record was not stored on every server in time");
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

/// The process's resident set now and at its peak since the last reset, in KiB.
fn rss_kib() -> (u64, u64) {
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

fn assert_loopback(record: &DialRecord) {
    let dials = record.addrs();
    assert!(!dials.is_empty(), "nothing was dialled at all");
    for (addr, _) in &dials {
        let ip = discovery::policy::ip_of(addr);
        assert!(
            ip.is_some_and(|ip| ip.is_loopback()),
            "dialled a non-loopback address: {addr}"
        );
    }
}

const VICTIMS: u8 = 10;

fn victim(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        0,
        0,
        2 + u8::try_from(i % usize::from(VICTIMS)).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_fake_providers_do_not_hide_the_honest_relay() {
    common::init();
    let (bootstrap, stored, server_stops) = start_storing_servers(3).await;
    let config = config(&bootstrap);
    let honest = start_relay(&config).await;
    let honest_dht: Vec<Multiaddr> = honest
        .status
        .borrow()
        .as_ref()
        .unwrap()
        .listen_addrs
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert!(!honest_dht.is_empty());
    let ports = closed_udp_ports(16);
    // Interleaved kinds, so every prefix of the stored list has each of them.
    let fakes: Vec<Vec<Multiaddr>> = (0..1000)
        .map(|i| match i % 3 {
            // Silent: a victim's IP, nobody listening.
            0 => vec![quic(victim(i), ports[i % ports.len()])],
            // Lying: the honest relay's own DHT addresses under another PeerId.
            1 => honest_dht.clone(),
            // An absurd address list at the victims' IPs.
            _ => (0..300)
                .map(|j| quic(victim(i + j), ports[j % ports.len()]))
                .collect(),
        })
        .collect();
    let registered = std::time::Instant::now();
    stream::iter(fakes)
        .for_each_concurrent(16, |addrs| register_fake(&bootstrap, &stored, addrs))
        .await;
    eprintln!(
        "registered 1000 fake provider records on 3 storing servers in {:?}",
        registered.elapsed()
    );
    for server in &stored {
        let stored = server.lock().unwrap();
        assert_eq!(stored.len(), 1001);
        assert!(stored.contains(&honest.addr.peer_id()));
    }

    // Peak memory of what follows: reset the high-water mark (Linux), then read it.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (rss_before, _) = rss_kib();
    let record = Arc::new(DialRecord::default());
    let found = discovery::discover(
        &config,
        seek(&record, 1, Duration::from_secs(1)),
        &CancellationToken::new(),
    )
    .await
    .expect("the honest relay was not found among 1000 fake providers");
    let (_, peak) = rss_kib();
    assert_eq!(found.relays[0].addr, honest.addr, "{found:?}");

    let dials = record.addrs();
    let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
    for (addr, _) in &dials {
        if let Some(ip) = discovery::policy::ip_of(addr) {
            *per_ip.entry(ip).or_default() += 1;
        }
    }
    let victim_dials: Vec<usize> = (0..usize::from(VICTIMS))
        .map(|i| per_ip.get(&IpAddr::V4(victim(i))).copied().unwrap_or(0))
        .collect();
    eprintln!(
        "FIGURES 1000 fake providers (333 silent at {VICTIMS} victim IPs, 333 copying the relay's addresses, 334 listing 300 addresses): \
         first verified relay after {:?}, discovery {:?}, dials by the client {} ({} to loopback 127.0.0.1, per victim IP {:?}), \
         RSS before {} KiB, peak during discovery {} KiB (+{} KiB), providers skipped after contact {}",
        found.first_usable,
        found.elapsed,
        dials.len(),
        per_ip
            .get(&IpAddr::V4(Ipv4Addr::LOCALHOST))
            .copied()
            .unwrap_or(0),
        victim_dials,
        rss_before,
        peak,
        peak.saturating_sub(rss_before),
        found.skipped,
    );
    // A victim's IP gets the selection's two failed attempts, plus at most what kad's own walk
    // (3 in parallel, ended after 3 answers) had started, never one per record naming it.
    let total: usize = victim_dials.iter().sum();
    assert!(
        total <= 2 * usize::from(VICTIMS) + 3,
        "{total} dials to victim IPs: {victim_dials:?}"
    );
    assert_loopback(&record);
    honest.stop.cancel();
    for stop in server_stops {
        stop.cancel();
    }
}
