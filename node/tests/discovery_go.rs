//! Discovery against go-like DHT servers on loopback ([`go_dht`]): servers that answer
//! provider lookups from a peerstore, as the public Amino DHT's go-libp2p-kad-dht servers do,
//! with go's lifetimes scaled down (a "minute" is a fraction of a second). Nothing here
//! touches the public network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod go_dht;

use std::{sync::Arc, time::Duration};

use go_dht::{GoDhtConfig, GoNet};
use libp2p::StreamProtocol;
use libp2p_identity::Keypair;
use tokengo::{
    config::Limits,
    discovery::{self, AddressPolicy, Announcer, Answer, DhtConfig, DialGuard, Seek},
    metrics::DhtMetrics,
    relay::Relay,
    status::{DhtState, DhtStatus},
    transport::{RelayAddr, TransportParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TEST_PROTOCOL: &str = "/tokengo-test/kad/1.0.0";
const WAIT: Duration = Duration::from_secs(30);
/// One go-clock minute in real time: go's 15-minute address TTL lasts 3 s here.
const MINUTE: Duration = Duration::from_millis(200);

fn dht(bootstrap: Vec<libp2p::Multiaddr>) -> DhtConfig {
    DhtConfig {
        bootstrap,
        protocol: StreamProtocol::new(TEST_PROTOCOL),
        policy: AddressPolicy::Loopback,
        timeout: Duration::from_secs(10),
    }
}

fn seek() -> Seek {
    Seek {
        cache: None,
        want: 1,
        settle: Duration::from_millis(200),
        params: TransportParams {
            idle_timeout: Duration::from_secs(30),
            max_incoming_streams: 0,
            keep_alive: false,
        },
        guard: DialGuard::default(),
        metrics: DhtMetrics::default(),
    }
}

fn relay_key() -> Vec<u8> {
    tokengo_proto::relay_info::provider_key(tokengo_proto::relay_info::RELAY_NAMESPACE)
}

struct AnnouncedRelay {
    addr: RelayAddr,
    probe: tokengo::relay::RelayProbe,
    status: watch::Receiver<Option<DhtStatus>>,
    metrics: Arc<tokengo::metrics::RelayMetrics>,
    stop: CancellationToken,
}

/// A real relay that announces itself on `config`'s DHT.
fn start_relay(config: DhtConfig, schedule: discovery::AnnounceSchedule) -> AnnouncedRelay {
    start_relay_at(config, schedule, Vec::new())
}

fn start_relay_at(
    config: DhtConfig,
    schedule: discovery::AnnounceSchedule,
    external_ips: Vec<std::net::IpAddr>,
) -> AnnouncedRelay {
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
    let probe = relay.probe();
    let info = tokengo::relay::relay_info_source(vec![addr.clone()], relay.registry());
    let stop = CancellationToken::new();
    tokio::spawn(relay.run(stop.clone()));
    let announcer = Announcer {
        identity,
        listen: "127.0.0.1:0".parse().unwrap(),
        external_ips,
        info: Answer::Relay(info),
        status: status_tx,
        metrics: metrics.dht.clone(),
        guard: DialGuard::default(),
    };
    let announce_stop = stop.clone();
    tokio::spawn(async move {
        discovery::announce_with(&config, announcer, schedule, announce_stop).await
    });
    AnnouncedRelay {
        addr,
        probe,
        status,
        metrics,
        stop,
    }
}

async fn wait_status(
    relay: &mut AnnouncedRelay,
    what: &str,
    done: impl Fn(&DhtStatus) -> bool,
) -> DhtStatus {
    let reached = tokio::time::timeout(WAIT, async {
        relay
            .status
            .wait_for(|s| s.as_ref().is_some_and(&done))
            .await
            .ok()
            .and_then(|s| s.clone())
    })
    .await;
    match reached {
        Ok(Some(status)) => status,
        _ => panic!("relay never {what}: {:?}", relay.status.borrow()),
    }
}

/// The schedule a relay runs with here: go's clock scaled like the servers'.
fn scaled_schedule() -> discovery::AnnounceSchedule {
    discovery::AnnounceSchedule::scaled(MINUTE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_is_still_found_twenty_minutes_after_publishing_on_go_like_servers() {
    common::init();
    let net = GoNet::start(&GoDhtConfig::scaled(TEST_PROTOCOL, MINUTE), 3).await;
    let config = dht(net.bootstrap());
    let mut relay = start_relay(config.clone(), scaled_schedule());
    wait_status(&mut relay, "announced", |s| s.state == DhtState::Announced).await;
    let peer = relay.addr.peer_id();
    // kad calls a provide done once ADD_PROVIDER is sent: wait until a server has it.
    tokio::time::timeout(WAIT, async {
        while net.stored(&relay_key(), &peer).0 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no go-like server stored the record");

    // A fresh identity verified the announcement ...
    let status = wait_status(&mut relay, "verified", |s| {
        s.verification != discovery::Verification::Checking
            && s.verification != discovery::Verification::NotYet
    })
    .await;
    assert_eq!(status.verification, discovery::Verification::Verified);
    assert_eq!(relay.metrics.dht.provider_verified.get(), 1);
    assert_eq!(net.dropped_add_provider(), 0);
    // Operators read it in /readyz, /status and the metric.
    let admin = common::start_admin(
        tokengo::admin::Role::Relay,
        vec![tokengo::RoleProbe::Relay(relay.probe.clone())],
    )
    .await;
    let (code, body) = admin.get("/readyz").await;
    assert_eq!(code, 200);
    assert!(body.contains("relay DHT: announced and verified"), "{body}");
    let (_, body) = admin.get("/status").await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        report["relay"]["dht"]["verification"]["state"], "verified",
        "{body}"
    );
    assert_eq!(
        admin
            .scrape()
            .await
            .get("tokengo_relay_dht_provider_verified"),
        1.0
    );
    admin.stop.cancel();

    // ... a client finds it right after publishing ...
    let first = discovery::discover(&config, seek(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(first.relays[0].addr, relay.addr);

    // ... and 20 go-minutes later: past go's 15-minute address lifetime after the relay's
    // connections to the servers closed. The wait is the subject of the test.
    tokio::time::sleep(MINUTE * 20).await;
    let later = discovery::discover(&config, seek(), &CancellationToken::new()).await;
    let later = later.unwrap_or_else(|e| {
        panic!(
            "relay not found 20 minutes after publishing: {e} (servers answered {} providers \
             without addresses)",
            net.answered_without_addrs()
        )
    });
    assert_eq!(later.relays[0].addr, relay.addr);
    relay.stop.cancel();
    net.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_announcement_whose_port_is_unreachable_is_reported_as_unverified() {
    common::init();
    // rust-libp2p servers, which answer exactly the record's addresses (go servers add the
    // listen addresses identify reports, here the reachable loopback one).
    let mut servers = Vec::new();
    let mut bootstrap = Vec::new();
    for _ in 0..3 {
        let server = tokengo::discovery::DhtServer::start(
            &dht(bootstrap.clone()),
            Keypair::generate_ed25519(),
            "127.0.0.1:0".parse().unwrap(),
            &[],
            DialGuard::default(),
        )
        .await
        .unwrap();
        bootstrap.extend(server.addrs().to_vec());
        let stop = CancellationToken::new();
        servers.push((stop.clone(), tokio::spawn(server.run(stop))));
    }
    let config = dht(bootstrap);
    // The relay's swarm listens on 127.0.0.1 but says it is reachable at 127.0.0.2 (a
    // forwarded port that is closed): the record is stored, nobody can dial it.
    let mut relay = start_relay_at(
        config,
        scaled_schedule(),
        vec!["127.0.0.2".parse().unwrap()],
    );
    let status = wait_status(&mut relay, "checked", |s| {
        matches!(s.verification, discovery::Verification::Unverified { .. })
    })
    .await;
    assert_eq!(status.state, DhtState::Announced);
    assert_eq!(status.external_addrs.len(), 1, "{status:?}");
    assert!(
        status.external_addrs[0].starts_with("/ip4/127.0.0.2/"),
        "{status:?}"
    );
    let discovery::Verification::Unverified { reason } = &status.verification else {
        unreachable!()
    };
    assert!(reason.contains("UDP"), "{reason}");
    assert_eq!(relay.metrics.dht.provider_verified.get(), 0);
    assert_eq!(relay.metrics.dht.provider_published.get(), 1);
    let admin = common::start_admin(
        tokengo::admin::Role::Relay,
        vec![tokengo::RoleProbe::Relay(relay.probe.clone())],
    )
    .await;
    let (_, body) = admin.get("/status").await;
    let report: tokengo::status::StatusReport = serde_json::from_str(&body).unwrap();
    let text = tokengo::status::summary(&report);
    assert!(text.contains("announced, unverified"), "{text}");
    assert!(
        admin
            .get("/readyz")
            .await
            .1
            .contains("relay DHT: announced, unverified")
    );
    admin.stop.cancel();
    relay.stop.cancel();
    for (stop, task) in servers {
        stop.cancel();
        task.await.unwrap();
    }
}
