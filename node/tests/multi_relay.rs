//! One exit, many relays: a single `tokengo exit` process given `--relay` twice keeps a
//! tunnel to each, serves the clients of both, and survives one relay dying (and re-registers
//! when it is back); a discovering exit that loses its relay finds another on the DHT. Real
//! exit processes; relays, DHT servers and clients in-process, all on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Process;
use libp2p::{Multiaddr, StreamProtocol};
use libp2p_identity::Keypair;
use tokengo::{
    config::Limits,
    discovery::{self, AddressPolicy, Announcer, Answer, DhtConfig, DhtServer, DialGuard},
    relay::Relay,
    status::{DhtState, StatusReport},
    transport::RelayAddr,
};
use tokio_util::sync::CancellationToken;

/// Longest any condition below is waited for.
const DEADLINE: Duration = Duration::from_secs(90);

/// A chat completion through the client at `url`: its HTTP status.
async fn chat(url: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "test",
            "messages": [{"role": "user", "content": "through which relay?"}],
        }))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// The exit process's `/status`.
async fn status(admin: &str) -> StatusReport {
    reqwest::get(format!("{admin}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls the exit's `/status` until `done` holds for it, or fails at the deadline.
async fn wait_status(admin: &str, what: &str, done: impl Fn(&StatusReport) -> bool) {
    let waited = tokio::time::timeout(DEADLINE, async {
        loop {
            if done(&status(admin).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "gave up waiting for {what}: {:?}",
        status(admin).await.exit
    );
}

/// Whether the exit's `/status` shows `relay` registered (`Some(true)`), held but not
/// registered (`Some(false)`), or not held at all (`None`).
fn tunnel(report: &StatusReport, relay: &RelayAddr) -> Option<bool> {
    let exit = report.exit.as_ref()?;
    exit.relays
        .iter()
        .find(|r| r.address == relay.to_string())
        .map(|r| r.registered)
}

/// Starts `tokengo exit ARGS` with an admin endpoint; returns the process and the admin URL.
async fn start_exit_process(args: &[String]) -> (Process, String) {
    let mut all: Vec<String> = [
        "exit",
        "--admin-listen",
        "127.0.0.1:0",
        "--worker-threads",
        "1",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    all.extend_from_slice(args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut process = Process::start(&all);
    let admin = process.line_after("admin endpoint on ").await;
    (process, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_exit_process_serves_the_clients_of_two_relays_and_survives_one_dying() {
    common::init();
    let backend = common::start_backend().await;
    let limits = Limits::default();
    let identity_a = Keypair::generate_ed25519();
    let relay_a =
        common::start_relay_with(&identity_a, "127.0.0.1:0".parse().unwrap(), &limits, None).await;
    let relay_b = common::start_relay(&limits, None).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut exit, admin) = start_exit_process(&[
        "--relay".into(),
        relay_a.addr.to_string(),
        "--relay".into(),
        relay_b.addr.to_string(),
        "--backend".into(),
        backend.url.clone(),
        "--data-dir".into(),
        dir.path().display().to_string(),
    ])
    .await;
    let mut registered = [
        exit.line_after("exit ").await,
        exit.line_after("exit ").await,
    ];
    registered.sort();
    let mut expected: Vec<String> = [&relay_a.addr, &relay_b.addr]
        .iter()
        .map(|r| format!("registered with relay {r}"))
        .collect();
    expected.sort();
    for (line, relay) in registered.iter().zip(&expected) {
        assert!(line.ends_with(relay.as_str()), "{line}");
    }
    let peer = status(&admin).await.exit.unwrap().peer_id;
    assert!(relay_a.registry.contains(&peer.parse().unwrap()));
    assert!(relay_b.registry.contains(&peer.parse().unwrap()));
    let report = status(&admin).await;
    assert_eq!(tunnel(&report, &relay_a.addr), Some(true));
    assert_eq!(tunnel(&report, &relay_b.addr), Some(true));

    let client_a = common::start_client(&relay_a.addr, &limits).await;
    let client_b = common::start_client(&relay_b.addr, &limits).await;
    for _ in 0..5 {
        assert_eq!(chat(&client_a.url).await, 200, "through relay A");
        assert_eq!(chat(&client_b.url).await, 200, "through relay B");
    }

    // Relay A dies: the exit keeps serving relay B's clients from the same process.
    let a_port = relay_a.addr.resolve().await.unwrap();
    relay_a.stop.cancel();
    relay_a.task.await.unwrap();
    wait_status(&admin, "relay A's tunnel to go down", |r| {
        tunnel(r, &relay_a.addr) == Some(false)
    })
    .await;
    for _ in 0..10 {
        assert_eq!(chat(&client_b.url).await, 200, "relay B still serves");
    }
    let report = status(&admin).await;
    let exit_status = report.exit.as_ref().unwrap();
    assert!(exit_status.registered, "still registered through relay B");
    assert_eq!(tunnel(&report, &relay_b.addr), Some(true));
    assert!(exit.child.try_wait().unwrap().is_none(), "the exit runs on");

    // Relay A is back (same identity and port): its tunnel reconnects on its own.
    let relay_a = common::start_relay_with(&identity_a, a_port, &limits, None).await;
    wait_status(&admin, "relay A's tunnel to register again", |r| {
        tunnel(r, &relay_a.addr) == Some(true)
    })
    .await;
    assert!(relay_a.registry.contains(&peer.parse().unwrap()));
    let metrics = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = common::Scrape::parse(&metrics);
    assert_eq!(scrape.get("tokengo_exit_relays"), 2.0);
    assert_eq!(scrape.get("tokengo_exit_relays_registered"), 2.0);

    client_a.stop.cancel();
    client_b.stop.cancel();
    relay_a.stop.cancel();
    relay_b.stop.cancel();
    backend.shut_down().await;
}

// ---------------------------------------------------------------- a lost relay is replaced

const TEST_PROTOCOL: &str = "/tokengo-test/kad/1.0.0";

fn dht_config(bootstrap: &[Multiaddr]) -> DhtConfig {
    DhtConfig {
        bootstrap: bootstrap.to_vec(),
        protocol: StreamProtocol::new(TEST_PROTOCOL),
        policy: AddressPolicy::Loopback,
        timeout: Duration::from_secs(30),
    }
}

fn guard() -> DialGuard {
    DialGuard {
        refused: Default::default(),
        observer: None,
    }
}

/// A relay on loopback announced on the DHT; returns its address, its stop token and its
/// task (the relay's, which ends when it stopped).
async fn announced_relay(
    bootstrap: &[Multiaddr],
) -> (RelayAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let identity = Keypair::generate_ed25519();
    let relay = Relay::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity,
        &Limits::default(),
    )
    .unwrap();
    let addr = relay.addr().clone();
    let status = relay.dht_status();
    let mut announced = status.subscribe();
    let metrics = relay.metrics();
    let info = tokengo::relay::relay_info_source(vec![addr.clone()], relay.registry());
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    let announcer = Announcer {
        identity,
        listen: "127.0.0.1:0".parse().unwrap(),
        external_ips: Vec::new(),
        info: Answer::Relay(info),
        status,
        metrics: metrics.dht.clone(),
        guard: guard(),
    };
    let (config, announce_stop) = (dht_config(bootstrap), stop.clone());
    tokio::spawn(async move { discovery::announce(&config, announcer, announce_stop).await });
    let published = tokio::time::timeout(
        DEADLINE,
        announced.wait_for(|s| s.as_ref().is_some_and(|s| s.state == DhtState::Announced)),
    )
    .await;
    assert!(published.is_ok(), "relay {addr} was never announced");
    (addr, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_discovering_exit_that_loses_its_relay_finds_another() {
    common::init();
    let backend = common::start_backend().await;
    let mut bootstrap = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let server = DhtServer::start(
            &dht_config(&bootstrap),
            Keypair::generate_ed25519(),
            "127.0.0.1:0".parse().unwrap(),
            &[],
            guard(),
        )
        .await
        .unwrap();
        bootstrap.extend(server.addrs().to_vec());
        let stop = CancellationToken::new();
        servers.push((stop.clone(), tokio::spawn(server.run(stop))));
    }
    let mut relays = vec![
        announced_relay(&bootstrap).await,
        announced_relay(&bootstrap).await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = [
        "--public",
        "--dht-announce",
        "false",
        "--max-relays",
        "1",
        "--dht-protocol",
        TEST_PROTOCOL,
        "--address-policy",
        "loopback",
        "--backend",
        &backend.url,
        "--data-dir",
        &dir.path().display().to_string(),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    for addr in &bootstrap {
        args.extend(["--bootstrap".to_owned(), addr.to_string()]);
    }
    let (mut exit, admin) = start_exit_process(&args).await;
    let first = exit.line_after("exit ").await;
    let used = relays
        .iter()
        .position(|(addr, _, _)| first.ends_with(&format!("registered with relay {addr}")))
        .unwrap_or_else(|| panic!("registered with an unknown relay: {first}"));
    let (lost, stop, task) = relays.remove(used);
    let (other, other_stop, other_task) = relays.remove(0);
    wait_status(&admin, "one relay held", |r| tunnel(r, &lost) == Some(true)).await;

    stop.cancel();
    task.await.unwrap();
    // The lost relay stays down: after a while the exit looks for another and registers.
    let second = exit.line_after("exit ").await;
    assert!(
        second.ends_with(&format!("registered with relay {other}")),
        "{second}"
    );
    wait_status(
        &admin,
        "the other relay registered, the lost one dropped",
        |r| tunnel(r, &other) == Some(true) && tunnel(r, &lost).is_none(),
    )
    .await;
    // Clients of the new relay reach the exit.
    let client = common::start_client(&other, &Limits::default()).await;
    assert_eq!(chat(&client.url).await, 200);

    client.stop.cancel();
    other_stop.cancel();
    other_task.await.unwrap();
    for (stop, task) in servers {
        stop.cancel();
        task.await.unwrap();
    }
    backend.shut_down().await;
}
