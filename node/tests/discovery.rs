//! Relay and exit discovery on a private DHT on loopback: three DHT servers, announcing relays
//! and exits, and clients that are given no relay, all with a test protocol name. Every dial any of
//! them attempts is recorded; the tests fail if one leaves loopback. Nothing here touches the
//! public network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{sync::Arc, time::Duration};

use libp2p::{Multiaddr, StreamProtocol};
use libp2p_identity::Keypair;
use tokengo::{
    RoleProbe, admin,
    client::Client,
    config::Limits,
    data_dir::DataDir,
    discovery::{
        self, AddressPolicy, Announcer, Answer, DhtConfig, DhtServer, DialGuard, DialRecord,
        InfoSource, RelayCache, Seek,
    },
    exit::Exit,
    metrics::DhtMetrics,
    relay::{Registry, Relay, RelayProbe},
    status::{DhtState, DhtStatus},
    transport::{RelayAddr, TransportParams},
};
use tokengo_proto::{
    exit_info::{ExitInfo, ExitInfoError, SignedExitInfo},
    relay_info::RelayInfo,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TEST_PROTOCOL: &str = "/tokengo-test/kad/1.0.0";
const WAIT: Duration = Duration::from_secs(30);

/// Everything a test started, and the record of every dial.
struct Net {
    record: Arc<DialRecord>,
    refused: prometheus_client::metrics::counter::Counter,
    servers: Vec<(CancellationToken, tokio::task::JoinHandle<()>)>,
    bootstrap: Vec<Multiaddr>,
}

impl Net {
    fn guard(&self) -> DialGuard {
        DialGuard {
            refused: self.refused.clone(),
            observer: Some(self.record.observer()),
        }
    }

    fn config(&self) -> DhtConfig {
        DhtConfig {
            bootstrap: self.bootstrap.clone(),
            protocol: StreamProtocol::new(TEST_PROTOCOL),
            policy: AddressPolicy::Loopback,
            timeout: WAIT,
        }
    }

    /// No DHT at all: for nodes that must report they cannot announce.
    fn without_servers() -> Self {
        Self {
            record: Arc::new(DialRecord::default()),
            refused: Default::default(),
            servers: Vec::new(),
            bootstrap: Vec::new(),
        }
    }

    /// Three DHT servers, each bootstrapping from those started before it.
    async fn start() -> Self {
        common::init();
        let mut net = Self::without_servers();
        for _ in 0..3 {
            let server = DhtServer::start(
                &net.config(),
                Keypair::generate_ed25519(),
                "127.0.0.1:0".parse().unwrap(),
                &[],
                net.guard(),
            )
            .await
            .unwrap();
            let addrs = server.addrs().to_vec();
            assert!(!addrs.is_empty());
            let stop = CancellationToken::new();
            let task = tokio::spawn(server.run(stop.clone()));
            net.servers.push((stop, task));
            net.bootstrap.extend(addrs);
        }
        net
    }

    async fn stop_servers(&mut self) {
        for (stop, task) in self.servers.drain(..) {
            stop.cancel();
            task.await.unwrap();
        }
    }

    /// Asserts every dial so far stayed on loopback and the policy refused nothing.
    fn assert_loopback_only(&self) {
        let dials = self.record.addrs();
        assert!(!dials.is_empty(), "nothing was dialled at all");
        for (addr, _) in &dials {
            let ip = discovery::policy::ip_of(addr);
            assert!(
                ip.is_some_and(|ip| ip.is_loopback()),
                "dialled a non-loopback address: {addr}"
            );
        }
        assert_eq!(self.refused.get(), 0, "the address policy refused dials");
    }

    fn seek(&self, cache: Option<RelayCache>, want: usize) -> Seek {
        Seek {
            cache,
            want,
            settle: Duration::from_secs(5),
            params: params(),
            guard: self.guard(),
            metrics: DhtMetrics::default(),
        }
    }
}

fn params() -> TransportParams {
    TransportParams {
        idle_timeout: Duration::from_secs(30),
        max_incoming_streams: 0,
        keep_alive: false,
    }
}

/// A relay on loopback that announces itself, with the relay-info `info` says (the real one
/// when `None`).
struct AnnouncedRelay {
    addr: RelayAddr,
    registry: Arc<Registry>,
    probe: RelayProbe,
    metrics: Arc<tokengo::metrics::RelayMetrics>,
    status: watch::Receiver<Option<DhtStatus>>,
    stop: CancellationToken,
}

async fn start_relay(
    net: &Net,
    config: DhtConfig,
    identity: Keypair,
    info: Option<InfoSource>,
) -> AnnouncedRelay {
    let relay = Relay::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity,
        &Limits::default(),
    )
    .unwrap();
    let addr = relay.addr().clone();
    let registry = relay.registry();
    let probe = relay.probe();
    let metrics = relay.metrics();
    let status_tx = relay.dht_status();
    let status = status_tx.subscribe();
    let info = info
        .unwrap_or_else(|| tokengo::relay::relay_info_source(vec![addr.clone()], relay.registry()));
    let stop = CancellationToken::new();
    tokio::spawn(relay.run(stop.clone()));
    let announcer = Announcer {
        identity,
        listen: "127.0.0.1:0".parse().unwrap(),
        external_ips: Vec::new(),
        info: Answer::Relay(info),
        status: status_tx,
        metrics: metrics.dht.clone(),
        guard: net.guard(),
    };
    let announce_stop = stop.clone();
    tokio::spawn(async move { discovery::announce(&config, announcer, announce_stop).await });
    AnnouncedRelay {
        addr,
        registry,
        probe,
        metrics,
        status,
        stop,
    }
}

async fn wait_state(relay: &mut AnnouncedRelay, state: DhtState) {
    let reached = tokio::time::timeout(
        WAIT,
        relay
            .status
            .wait_for(|s| s.as_ref().is_some_and(|s| s.state == state)),
    )
    .await
    .is_ok();
    assert!(
        reached,
        "relay never reached {state:?}: {:?}",
        relay.status.borrow()
    );
}

/// An exit that discovers its relays, registered with all of them: what `tokengo exit --public`
/// does without `--relay` (a private exit refuses to start without one; see `exit_access.rs`).
async fn start_exit(
    net: &Net,
    backend_url: &str,
    dir: &tempfile::TempDir,
) -> (libp2p_identity::PeerId, Vec<RelayAddr>, CancellationToken) {
    let data_dir = DataDir::resolve(Some(dir.path().to_path_buf())).unwrap();
    let backend = common::backend_config(backend_url, Duration::from_secs(10));
    let exit = Exit::load(&data_dir, &backend, Limits::default()).unwrap();
    let peer = exit.peer_id();
    let found = discovery::discover(&net.config(), net.seek(None, 2), &CancellationToken::new())
        .await
        .unwrap();
    let relays: Vec<RelayAddr> = found.relays.into_iter().map(|r| r.addr).collect();
    let (tx, mut registered) = watch::channel(false);
    let stop = CancellationToken::new();
    tokio::spawn(exit.run_many(relays.clone(), tx, None, stop.clone()));
    tokio::time::timeout(WAIT, registered.wait_for(|r| *r))
        .await
        .expect("exit did not register")
        .unwrap();
    (peer, relays, stop)
}

/// A client on the relays discovery found; returns its HTTP base URL.
async fn start_client(relays: Vec<RelayAddr>) -> (String, CancellationToken) {
    let client = Client::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        relays,
        Limits::default(),
        tokengo::client::ClientPolicy::default(),
        DhtMetrics::default(),
    )
    .await
    .unwrap();
    client.check_relay().await.unwrap();
    let url = format!("http://{}", client.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(client.run(stop.clone()));
    (url, stop)
}

async fn chat(url: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "test",
            "messages": [{"role": "user", "content": "found through the DHT"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn wait_registered(registry: &Registry, peer: &libp2p_identity::PeerId) {
    tokio::time::timeout(WAIT, async {
        while !registry.contains(peer) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("exit never registered with the relay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_and_exit_find_relays_on_a_private_dht_and_a_request_goes_through() {
    let net = Net::start().await;
    let backend = common::start_backend().await;
    let mut relay_a = start_relay(&net, net.config(), Keypair::generate_ed25519(), None).await;
    let mut relay_b = start_relay(&net, net.config(), Keypair::generate_ed25519(), None).await;
    wait_state(&mut relay_a, DhtState::Announced).await;
    wait_state(&mut relay_b, DhtState::Announced).await;
    assert_eq!(relay_a.metrics.dht.external_address_confirmed.get(), 1);
    assert_eq!(relay_a.metrics.dht.provider_published.get(), 1);

    let exit_dir = tempfile::tempdir().unwrap();
    let (exit_peer, exit_relays, exit_stop) = start_exit(&net, &backend.url, &exit_dir).await;
    assert_eq!(exit_relays.len(), 2, "the exit registers with both relays");
    wait_registered(&relay_a.registry, &exit_peer).await;
    wait_registered(&relay_b.registry, &exit_peer).await;

    let client_dir = tempfile::tempdir().unwrap();
    let cache = RelayCache::new(client_dir.path().join(discovery::CACHE_FILE));
    let found = discovery::discover(
        &net.config(),
        net.seek(Some(cache.clone()), 3),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(found.relays.len(), 2);
    assert!(found.relays.iter().all(|r| r.exits == 1), "{found:?}");
    assert!(found.first_usable <= found.elapsed);
    assert_eq!(cache.load(tokengo::clock::unix_now()).len(), 2);

    let (url, client_stop) = start_client(found.relays.into_iter().map(|r| r.addr).collect()).await;
    let echoed = chat(&url).await;
    assert_eq!(echoed["path"], "/v1/chat/completions");
    assert!(
        echoed["body"]
            .as_str()
            .unwrap()
            .contains("found through the DHT")
    );

    // The relay reports its DHT state in /status.
    let status = relay_a.probe.status(None);
    assert_eq!(status.dht.unwrap().state, DhtState::Announced);
    net.assert_loopback_only();
    client_stop.cancel();
    exit_stop.cancel();
    relay_a.stop.cancel();
    relay_b.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_without_external_address_is_reported_not_silently_invisible() {
    common::init();
    let net = Net::without_servers();
    // Policy `any` confirms nothing by itself, and no external address is configured.
    let config = DhtConfig {
        policy: AddressPolicy::Any,
        ..net.config()
    };
    let mut relay = start_relay(&net, config, Keypair::generate_ed25519(), None).await;
    wait_state(&mut relay, DhtState::NoExternalAddress).await;
    let admin = common::start_admin(
        admin::Role::Relay,
        vec![RoleProbe::Relay(relay.probe.clone())],
    )
    .await;
    let scrape = admin.scrape().await;
    assert_eq!(
        scrape.get("tokengo_relay_dht_external_address_confirmed"),
        0.0
    );
    assert_eq!(scrape.get("tokengo_relay_dht_provider_published"), 0.0);
    let (code, body) = admin.get("/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        status["relay"]["dht"]["state"], "no_external_address",
        "{body}"
    );
    assert_eq!(
        status["relay"]["dht"]["external_addrs"],
        serde_json::json!([])
    );
    relay.stop.cancel();
    admin.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_and_lying_providers_are_skipped_and_the_good_relay_is_found() {
    let net = Net::start().await;
    let mut good = start_relay(&net, net.config(), Keypair::generate_ed25519(), None).await;
    // A provider that never answers relay-info.
    let silent: InfoSource = Arc::new(|| None);
    let mut quiet = start_relay(
        &net,
        net.config(),
        Keypair::generate_ed25519(),
        Some(silent),
    )
    .await;
    // A provider whose relay-info names its own PeerId at the good relay's QUIC socket: the
    // certificate there proves another identity, so the TLS check must refuse it.
    let liar_key = Keypair::generate_ed25519();
    let liar_peer = liar_key.public().to_peer_id();
    let good_socket = good.addr.resolve().await.unwrap();
    let lie = RelayAddr::new(good_socket, liar_peer)
        .to_multiaddr()
        .to_vec();
    let lying: InfoSource = Arc::new(move || {
        Some(RelayInfo {
            quic_addrs: vec![lie.clone()],
            alpns: vec![b"tokengo/1".to_vec(), b"tokengo-exit/1".to_vec()],
            exits: vec![],
        })
    });
    let mut liar = start_relay(&net, net.config(), liar_key, Some(lying)).await;
    for relay in [&mut good, &mut quiet, &mut liar] {
        wait_state(relay, DhtState::Announced).await;
    }
    let found = discovery::discover(&net.config(), net.seek(None, 3), &CancellationToken::new())
        .await
        .unwrap();
    let peers: Vec<_> = found.relays.iter().map(|r| r.addr.peer_id()).collect();
    assert_eq!(peers, vec![good.addr.peer_id()], "{found:?}");
    assert_eq!(found.skipped, 2, "{found:?}");
    net.assert_loopback_only();
    for relay in [good, quiet, liar] {
        relay.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_relay_is_used_when_the_dht_is_unreachable() {
    let mut net = Net::start().await;
    let backend = common::start_backend().await;
    let mut relay = start_relay(&net, net.config(), Keypair::generate_ed25519(), None).await;
    wait_state(&mut relay, DhtState::Announced).await;
    let exit = common::start_exit(
        &relay.addr,
        common::backend_config(&backend.url, Duration::from_secs(10)),
        &Limits::default(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cache = RelayCache::new(dir.path().join(discovery::CACHE_FILE));
    let first = discovery::discover(
        &net.config(),
        net.seek(Some(cache.clone()), 1),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(first.relays[0].addr, relay.addr);

    // The DHT goes away; a second start still gets its relay from the cache.
    net.stop_servers().await;
    let mut seek = net.seek(Some(cache), 1);
    seek.settle = Duration::from_millis(200);
    let second = discovery::discover(&net.config(), seek, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(second.relays.len(), 1);
    assert_eq!(second.relays[0].addr, relay.addr);
    let (url, client_stop) = start_client(vec![second.relays[0].addr.clone()]).await;
    assert_eq!(chat(&url).await["path"], "/v1/chat/completions");

    // Without cache and without DHT, discovery says what to do.
    let mut config = net.config();
    config.timeout = Duration::from_secs(2);
    let nothing = discovery::discover(&config, net.seek(None, 1), &CancellationToken::new()).await;
    let error = nothing.as_ref().unwrap_err().to_string();
    assert!(
        error.contains("--relay") && error.contains("--bootstrap"),
        "{error}"
    );
    // ... and a configured fallback relay is then what a start uses.
    let relays = discovery::or_fallback(nothing, std::slice::from_ref(&relay.addr)).unwrap();
    assert_eq!(relays, vec![relay.addr.clone()]);
    net.assert_loopback_only();
    client_stop.cancel();
    exit.stop.cancel();
    relay.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_fails_over_to_the_next_relay() {
    common::init();
    let backend = common::start_backend().await;
    let limits = Limits::default();
    let relay = common::start_relay(&limits, None).await;
    let exit = common::start_exit(
        &relay.addr,
        common::backend_config(&backend.url, Duration::from_secs(10)),
        &limits,
    )
    .await;
    // First in line: the good relay's socket under another identity, which TLS refuses.
    let impostor = Keypair::generate_ed25519().public().to_peer_id();
    let wrong = RelayAddr::new(relay.addr.resolve().await.unwrap(), impostor);
    let (url, client_stop) = start_client(vec![wrong, relay.addr.clone()]).await;
    assert_eq!(chat(&url).await["path"], "/v1/chat/completions");
    client_stop.cancel();
    exit.stop.cancel();
    relay.stop.cancel();
}

// ------------------------------------------------------------------------------------- exits

/// Polls the exit's `/status` view until its DHT announcement reaches `state`.
async fn wait_exit_state(probe: &tokengo::exit::ExitProbe, state: DhtState) {
    let reached = tokio::time::timeout(WAIT, async {
        while probe.status(None).dht.as_ref().map(|d| d.state) != Some(state) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_ok();
    assert!(
        reached,
        "exit never reached {state:?}: {:?}",
        probe.status(None).dht
    );
}

/// A real exit registered with `relays` that announces itself on the DHT of `config`.
struct AnnouncedExit {
    peer: libp2p_identity::PeerId,
    probe: tokengo::exit::ExitProbe,
    stop: CancellationToken,
}

async fn start_announced_exit(
    net: &Net,
    config: DhtConfig,
    backend_url: &str,
    dir: &tempfile::TempDir,
    relays: Vec<RelayAddr>,
) -> AnnouncedExit {
    let data_dir = DataDir::resolve(Some(dir.path().to_path_buf())).unwrap();
    let backend = common::backend_config(backend_url, Duration::from_secs(10));
    let exit = Exit::load(&data_dir, &backend, Limits::default()).unwrap();
    let peer = exit.peer_id();
    let (tx, registered) = watch::channel(false);
    let probe = exit.probe_all(registered.clone());
    let announce = tokengo::config::ExitAnnounceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        external_ips: Vec::new(),
    };
    let announcer = exit.announcer(&announce, registered, net.guard());
    let stop = CancellationToken::new();
    let announce_stop = stop.clone();
    tokio::spawn(async move { discovery::announce(&config, announcer, announce_stop).await });
    // Counts each relay's first registration, made after the exit's relay list has it.
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel();
    let hook: tokengo::exit::RegisteredHook = Arc::new(move |relay: &RelayAddr| {
        let _ = first_tx.send(relay.clone());
    });
    let count = relays.len();
    tokio::spawn(exit.run_many(relays, tx, Some(hook), stop.clone()));
    for _ in 0..count {
        tokio::time::timeout(WAIT, first_rx.recv())
            .await
            .expect("the exit did not register with every relay")
            .unwrap();
    }
    AnnouncedExit { peer, probe, stop }
}

fn lookup(net: &Net) -> discovery::ExitLookup {
    discovery::ExitLookup {
        settle: Duration::from_secs(5),
        guard: net.guard(),
        ..discovery::ExitLookup::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exit_announces_itself_and_a_fresh_identity_finds_it_with_both_relays() {
    let net = Net::start().await;
    let backend = common::start_backend().await;
    let mut relay_a = start_relay(&net, net.config(), Keypair::generate_ed25519(), None).await;
    let mut relay_b = start_relay(&net, net.config(), Keypair::generate_ed25519(), None).await;
    wait_state(&mut relay_a, DhtState::Announced).await;
    wait_state(&mut relay_b, DhtState::Announced).await;
    let dir = tempfile::tempdir().unwrap();
    let exit = start_announced_exit(
        &net,
        net.config(),
        &backend.url,
        &dir,
        vec![relay_a.addr.clone(), relay_b.addr.clone()],
    )
    .await;
    wait_exit_state(&exit.probe, DhtState::Announced).await;

    let found = discovery::find_exits(&net.config(), lookup(&net), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let found = &found[0];
    assert_eq!(found.descriptor.peer_id, exit.peer);
    assert_eq!(
        found.relays,
        vec![relay_a.addr.clone(), relay_b.addr.clone()]
    );
    // The DHT and both relays show the same descriptor, byte for byte.
    let now = tokengo::clock::unix_now();
    for relay in [&relay_a, &relay_b] {
        let listed: Vec<Vec<u8>> = relay
            .registry
            .descriptors(now)
            .iter()
            .map(|d| d.to_vec())
            .collect();
        assert_eq!(listed, vec![found.descriptor_bytes.clone()]);
    }
    // A client on a relay the exit record names reaches the exit.
    let (url, client_stop) = start_client(vec![found.relays[1].clone()]).await;
    assert_eq!(chat(&url).await["path"], "/v1/chat/completions");
    client_stop.cancel();
    // The exit is no relay: relay discovery still finds exactly the two relays.
    let relays = discovery::discover(&net.config(), net.seek(None, 3), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(relays.relays.len(), 2, "{relays:?}");
    net.assert_loopback_only();
    exit.stop.cancel();
    relay_a.stop.cancel();
    relay_b.stop.cancel();
}

/// A DHT participant announcing the exit key with its own identity and answering exit-info
/// with whatever `answer` returns.
async fn start_fake_exit(
    net: &Net,
    identity: Keypair,
    answer: discovery::ExitInfoSource,
) -> (CancellationToken, watch::Receiver<Option<DhtStatus>>) {
    let status = Arc::new(watch::Sender::new(None));
    let mut seen = status.subscribe();
    let (_registered_tx, registered) = watch::channel(true);
    let announcer = Announcer {
        identity,
        listen: "127.0.0.1:0".parse().unwrap(),
        external_ips: Vec::new(),
        info: Answer::Exit {
            info: answer,
            registered,
        },
        status,
        metrics: DhtMetrics::default(),
        guard: net.guard(),
    };
    let stop = CancellationToken::new();
    let config = net.config();
    let announce_stop = stop.clone();
    tokio::spawn(async move { discovery::announce(&config, announcer, announce_stop).await });
    tokio::time::timeout(
        WAIT,
        seen.wait_for(|s| s.as_ref().is_some_and(|s| s.state == DhtState::Announced)),
    )
    .await
    .expect("fake exit never announced")
    .unwrap();
    (stop, seen)
}

fn fake_descriptor(key: &Keypair, issued_at: u64, expires_at: u64) -> Vec<u8> {
    let desc = tokengo_proto::descriptor::Descriptor {
        peer_id: key.public().to_peer_id(),
        key_configs: vec![tokengo_proto::key_config::KeyConfig {
            key_id: 1,
            public_key: [3; 32],
        }],
        models: vec!["test".into()],
        issued_at,
        expires_at,
        max_streams: 4,
        access_token_required: false,
    };
    tokengo_proto::descriptor::SignedDescriptor::sign(&desc, key)
        .unwrap()
        .as_bytes()
        .to_vec()
}

fn fixed_answer(bytes: Vec<u8>) -> discovery::ExitInfoSource {
    let answer = SignedExitInfo::from_bytes(bytes).unwrap();
    Arc::new(move || Some(answer.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_info_with_a_tampered_relay_list_or_a_stale_descriptor_is_refused() {
    let net = Net::start().await;
    let mut relay = start_relay(&net, net.config(), Keypair::generate_ed25519(), None).await;
    wait_state(&mut relay, DhtState::Announced).await;
    let now = tokengo::clock::unix_now();
    let relay_bytes = relay.addr.to_multiaddr().to_vec();
    let sign = |key: &Keypair, descriptor: Vec<u8>, issued_at: u64| {
        let info = ExitInfo {
            issued_at,
            descriptor,
            relays: vec![relay_bytes.clone()],
        };
        SignedExitInfo::sign(&info, key)
            .unwrap()
            .as_bytes()
            .to_vec()
    };

    // A well-formed answer: found (so the others are refused for what they are, not missed).
    let honest_key = Keypair::generate_ed25519();
    let honest = sign(
        &honest_key,
        fake_descriptor(&honest_key, now - 5, now + 3600),
        now,
    );
    let honest_peer = honest_key.public().to_peer_id();
    let (honest_stop, _) = start_fake_exit(&net, honest_key, fixed_answer(honest)).await;

    // The relay list changed after signing: another relay of the same address length in
    // place of the one the exit signed for.
    let tampered_key = Keypair::generate_ed25519();
    let mut tampered = sign(
        &tampered_key,
        fake_descriptor(&tampered_key, now - 5, now + 3600),
        now,
    );
    let rogue = RelayAddr::new(
        relay.addr.resolve().await.unwrap(),
        Keypair::generate_ed25519().public().to_peer_id(),
    )
    .to_multiaddr()
    .to_vec();
    assert_eq!(rogue.len(), relay_bytes.len());
    let at = tampered
        .windows(relay_bytes.len())
        .position(|w| w == relay_bytes.as_slice())
        .unwrap();
    tampered[at..at + rogue.len()].copy_from_slice(&rogue);
    assert_eq!(
        SignedExitInfo::from_bytes(tampered.clone())
            .unwrap()
            .verify(now),
        Err(ExitInfoError::BadSignature)
    );
    let (tampered_stop, _) = start_fake_exit(&net, tampered_key, fixed_answer(tampered)).await;

    // A fresh answer around a descriptor that expired since it was signed.
    let stale_key = Keypair::generate_ed25519();
    let stale = sign(
        &stale_key,
        fake_descriptor(&stale_key, now - 200, now - 100),
        now - 150,
    );
    let (stale_stop, _) = start_fake_exit(&net, stale_key, fixed_answer(stale)).await;

    let found = discovery::find_exits(&net.config(), lookup(&net), &CancellationToken::new())
        .await
        .unwrap();
    let peers: Vec<_> = found.iter().map(|e| e.descriptor.peer_id).collect();
    assert_eq!(peers, vec![honest_peer], "{found:?}");
    assert_eq!(found[0].relays, vec![relay.addr.clone()]);
    net.assert_loopback_only();
    for stop in [honest_stop, tampered_stop, stale_stop] {
        stop.cancel();
    }
    relay.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_without_external_address_is_reported_not_announced() {
    common::init();
    let net = Net::without_servers();
    let backend = common::start_backend().await;
    // Policy `any` confirms nothing by itself (an exit behind NAT): nobody would store its
    // record, so it reports that instead of pretending.
    let config = DhtConfig {
        policy: AddressPolicy::Any,
        ..net.config()
    };
    let relay = common::start_relay(&Limits::default(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let exit =
        start_announced_exit(&net, config, &backend.url, &dir, vec![relay.addr.clone()]).await;
    wait_exit_state(&exit.probe, DhtState::NoExternalAddress).await;
    assert_eq!(exit.probe.metrics().dht.external_address_confirmed.get(), 0);
    assert_eq!(exit.probe.metrics().dht.provider_published.get(), 0);
    exit.stop.cancel();
    relay.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discovery_finds_exits_on_the_dht_and_uses_a_relay_that_hosts_them() {
    let net = Net::start().await;
    // A relay the client finds on the DHT, with an exit only it lists (anyone can register
    // one; so can the relay's operator): one source vouches for that exit.
    let mut announced = start_relay(&net, net.config(), Keypair::generate_ed25519(), None).await;
    wait_state(&mut announced, DhtState::Announced).await;
    let rogue_backend = common::start_recording_backend(Duration::ZERO).await;
    let rogue = common::start_exit(
        &announced.addr,
        common::backend_config(&rogue_backend.url, Duration::from_secs(10)),
        &Limits::default(),
    )
    .await;
    // A relay that does not announce itself, with an exit that does: the client can only
    // learn of both from the exit's record on the DHT.
    let hidden = common::start_relay(&Limits::default(), None).await;
    let backend = common::start_recording_backend(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let exit = start_announced_exit(
        &net,
        net.config(),
        &backend.url,
        &dir,
        vec![hidden.addr.clone()],
    )
    .await;
    wait_exit_state(&exit.probe, DhtState::Announced).await;

    // A real `tokengo client` given no relay.
    let mut args: Vec<String> = [
        "--address-policy",
        "loopback",
        "--dht-protocol",
        TEST_PROTOCOL,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    for bootstrap in &net.config().bootstrap {
        args.extend(["--bootstrap".to_owned(), bootstrap.to_string()]);
    }
    let client = common::start_client_process(&[], &args).await;
    let (admin, url) = (&client.admin, &client.url);

    // The exit found on the DHT is listed by the relay it named: two sources vouch for it.
    let peer = exit.peer.to_string();
    let status = tokio::time::timeout(WAIT, async {
        loop {
            reqwest::get(format!("{admin}/readyz")).await.unwrap();
            let report: tokengo::status::StatusReport = reqwest::get(format!("{admin}/status"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let status = report.client.unwrap();
            if status
                .exits
                .iter()
                .any(|e| e.peer_id == peer && e.vouched_by.len() == 2)
            {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the client never saw the DHT exit vouched for by the DHT and its relay");
    assert!(
        status
            .relays
            .iter()
            .any(|r| r.address == hidden.addr.to_string()),
        "{status:?}"
    );
    let vouched = status.exits.iter().find(|e| e.peer_id == peer).unwrap();
    assert!(
        vouched.vouched_by.contains(&"the DHT".to_owned()),
        "{vouched:?}"
    );
    for _ in 0..20 {
        let response = reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "test", "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // Every request took the corroborated exit, through the relay that hosts it; the exit
    // only the announced relay vouches for got none.
    assert_eq!(backend.hits("/v1/chat/completions"), 20);
    assert_eq!(rogue_backend.hits("/v1/chat/completions"), 0);
    assert!(hidden.probe.metrics().forwards_total() >= 20);
    net.assert_loopback_only();
    exit.stop.cancel();
    rogue.stop.cancel();
    hidden.stop.cancel();
    announced.stop.cancel();
}
