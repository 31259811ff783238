//! Relay lookups against DHTs full of records: many honest relays on `tokengo bootstrap`
//! servers. All on loopback with a test protocol name; the client's own dials are recorded
//! and must stay on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{sync::Arc, time::Duration};

use libp2p::{Multiaddr, StreamProtocol};
use libp2p_identity::Keypair;
use tokengo::{
    config::Limits,
    discovery::{
        self, AddressPolicy, Announcer, Answer, DhtConfig, DhtServer, DialGuard, DialRecord, Seek,
    },
    metrics::DhtMetrics,
    relay::Relay,
    status::DhtState,
    transport::{RelayAddr, TransportParams},
};
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
    let info = tokengo::relay::relay_info_source(vec![addr.clone()], relay.registry());
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
    AnnouncedRelay { addr, stop }
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
