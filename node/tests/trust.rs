//! No relay can choose, swap or steer the exit a client uses (issue 11). Real `tokengo`
//! client and serve processes on loopback, relays and exits over real QUIC and OHTTP, one
//! recording backend per exit to count where requests went.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{
    Backend, ClientProcess, ExitHandle, Process, backend_config, limits, start_exit, start_relay,
};
use libp2p_identity::{Keypair, PeerId};
use tokengo::{
    relay::Registry,
    relay_link::{RelayLink, list_exits},
    stream::StreamReader,
    transport::{self, RelayAddr, TransportParams},
};
use tokengo_proto::{
    descriptor::{Descriptor, SignedDescriptor},
    frame::{self, ClientRequest, Status},
    key_config::KeyConfig,
};
use tokio_util::sync::CancellationToken;

const CHAT: &str = "/v1/chat/completions";

fn params() -> TransportParams {
    TransportParams {
        idle_timeout: Duration::from_secs(30),
        max_incoming_streams: 64,
        keep_alive: false,
    }
}

/// A `tokengo client` process on `relays`, pinned to `pinned` when not empty.
async fn start_client(relays: &[&RelayAddr], pinned: &[PeerId]) -> ClientProcess {
    let args: Vec<String> = pinned
        .iter()
        .flat_map(|exit| ["--exit".to_owned(), exit.to_string()])
        .collect();
    common::start_client_process(relays, &args).await
}

/// An exit with a backend of its own that records what reaches it.
struct RecordedExit {
    exit: ExitHandle,
    backend: Backend,
}

async fn recorded_exit(relays: &[&RelayAddr], delay: Duration) -> RecordedExit {
    let backend = common::start_recording_backend(delay).await;
    let exit = start_exit(
        relays[0],
        backend_config(&backend.url, Duration::from_secs(30)),
        &limits(),
    )
    .await;
    RecordedExit { exit, backend }
}

/// A recorded exit registered with every relay of `relays`; returns its PeerId, its backend
/// and what stops it.
async fn exit_on_relays(relays: &[&RelayAddr]) -> (PeerId, Backend, CancellationToken) {
    let backend = common::start_recording_backend(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = tokengo::data_dir::DataDir::resolve(Some(dir.path().to_path_buf())).unwrap();
    let exit = tokengo::exit::Exit::load(
        &data_dir,
        &backend_config(&backend.url, Duration::from_secs(30)),
        limits(),
    )
    .unwrap();
    let peer = exit.peer_id();
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel();
    let hook: tokengo::exit::RegisteredHook = Arc::new(move |relay: &RelayAddr| {
        let _ = first_tx.send(relay.clone());
    });
    let (registered, _) = tokio::sync::watch::channel(false);
    let stop = CancellationToken::new();
    let relays: Vec<RelayAddr> = relays.iter().map(|r| (*r).clone()).collect();
    let count = relays.len();
    let cancel = stop.clone();
    tokio::spawn(async move {
        let _dir = dir;
        exit.run_many(relays, registered, Some(hook), cancel).await
    });
    for _ in 0..count {
        tokio::time::timeout(Duration::from_secs(30), first_rx.recv())
            .await
            .expect("the exit did not register with every relay")
            .unwrap();
    }
    (peer, backend, stop)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

async fn wait_registered(registry: &Registry, exit: PeerId, registered: bool) {
    wait_until("the relay's registry changed", || {
        registry.contains(&exit) == registered
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_client_never_uses_a_rogue_exit_and_names_the_pinned_exit_when_it_is_down() {
    common::init();
    let relay = start_relay(&limits(), None).await;
    let honest = recorded_exit(&[&relay.addr], Duration::ZERO).await;
    // Anyone can register an exit with a relay, the relay's operator included; this one is
    // faster, so an unpinned latency-first client would take it.
    let rogue = recorded_exit(&[&relay.addr], Duration::ZERO).await;
    let client = start_client(&[&relay.addr], &[honest.exit.peer_id]).await;

    for _ in 0..30 {
        let (status, body) = client.chat(false).await;
        assert_eq!(status, 200, "{body}");
    }
    println!(
        "pinned: honest exit {} requests, rogue exit {} requests",
        honest.backend.hits(CHAT),
        rogue.backend.hits(CHAT)
    );
    assert_eq!(honest.backend.hits(CHAT), 30);
    assert_eq!(rogue.backend.hits(CHAT), 0);

    // `tokengo status` shows the pinned set.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo"))
        .args(["status", "--admin", &client.admin])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!(
            "pinned exits (no other is used): {}",
            honest.exit.peer_id
        )),
        "{stdout}"
    );
    let report = client.refreshed_status().await;
    let status = report.client.unwrap();
    assert_eq!(status.pinned_exits, vec![honest.exit.peer_id.to_string()]);
    assert_eq!(status.exits.len(), 1, "only the pinned exit is usable");

    // The pinned exit goes away: the user is told, by name, and nothing reaches the rogue.
    honest.exit.stop.cancel();
    wait_registered(&relay.registry, honest.exit.peer_id, false).await;
    let (status, body) = client.chat(false).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "pinned_exit_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&honest.exit.peer_id.to_string()),
        "{message}"
    );
    assert!(
        message.contains("no longer listed by any relay"),
        "{message}"
    );
    assert!(message.contains("exit no longer registered"), "{message}");
    assert!(
        message.contains(&relay.addr.peer_id().to_string()),
        "{message}"
    );
    println!("pinned exit down: {status} {message}");
    assert_eq!(rogue.backend.hits(CHAT), 0);

    // No relay answers either: still the 503 that names the pinned exit, with the relay's error.
    relay.stop.cancel();
    relay.task.await.unwrap();
    let (status, body) = client.chat(false).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "pinned_exit_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&honest.exit.peer_id.to_string()) && message.contains("unreachable"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_does_not_list_the_pinned_exit_is_skipped() {
    common::init();
    let empty = start_relay(&limits(), None).await;
    let hosting = start_relay(&limits(), None).await;
    let other = recorded_exit(&[&empty.addr], Duration::ZERO).await;
    let pinned = recorded_exit(&[&hosting.addr], Duration::ZERO).await;
    let client = start_client(&[&empty.addr, &hosting.addr], &[pinned.exit.peer_id]).await;
    for _ in 0..10 {
        let (status, body) = client.chat(false).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(pinned.backend.hits(CHAT), 10);
    assert_eq!(other.backend.hits(CHAT), 0);
    let status = client.refreshed_status().await.client.unwrap();
    assert_eq!(status.relays.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinned_an_exit_only_one_relay_lists_is_not_used_while_corroborated_ones_exist() {
    common::init();
    let first = start_relay(&limits(), None).await;
    let second = start_relay(&limits(), None).await;
    let (corroborated, corroborated_backend, stop) =
        exit_on_relays(&[&first.addr, &second.addr]).await;
    // Registered with the first relay only (by its operator, say), and faster.
    let single = recorded_exit(&[&first.addr], Duration::ZERO).await;
    let client = start_client(&[&first.addr, &second.addr], &[]).await;
    let status = client.refreshed_status().await.client.unwrap();
    assert_eq!(status.exits.len(), 2, "{status:?}");
    let listed = status
        .exits
        .iter()
        .find(|e| e.peer_id == corroborated.to_string())
        .unwrap();
    assert_eq!(listed.vouched_by.len(), 2, "{listed:?}");
    for _ in 0..30 {
        let (status, body) = client.chat(false).await;
        assert_eq!(status, 200, "{body}");
    }
    println!(
        "corroborated exit {} requests, single-relay exit {}",
        corroborated_backend.hits(CHAT),
        single.backend.hits(CHAT)
    );
    assert_eq!(corroborated_backend.hits(CHAT), 30);
    assert_eq!(single.backend.hits(CHAT), 0);
    // Both relays carried requests: the relay is picked after the exit, among those hosting it.
    assert!(first.probe.metrics().forwards_total() > 0);
    assert!(second.probe.metrics().forwards_total() > 0);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinned_a_fast_newcomer_gets_a_fair_share_not_all() {
    common::init();
    let relay = start_relay(&limits(), None).await;
    // Honest exits whose backends take 30 ms; the newcomer answers at once.
    let mut honest = Vec::new();
    for _ in 0..3 {
        honest.push(recorded_exit(&[&relay.addr], Duration::from_millis(30)).await);
    }
    let client = start_client(&[&relay.addr], &[]).await;
    for _ in 0..30 {
        assert_eq!(client.chat(false).await.0, 200);
    }
    let newcomer = recorded_exit(&[&relay.addr], Duration::ZERO).await;
    let status = client.refreshed_status().await.client.unwrap();
    assert_eq!(status.exits.len(), 4, "the client sees the newcomer");
    let before: Vec<usize> = honest.iter().map(|e| e.backend.hits(CHAT)).collect();
    let total = 200;
    for _ in 0..total {
        assert_eq!(client.chat(false).await.0, 200);
    }
    let newcomer_hits = newcomer.backend.hits(CHAT);
    let honest_hits: Vec<usize> = honest
        .iter()
        .zip(&before)
        .map(|(e, b)| e.backend.hits(CHAT) - b)
        .collect();
    assert_eq!(newcomer_hits + honest_hits.iter().sum::<usize>(), total);
    let share = newcomer_hits as f64 / total as f64;
    let metrics = client.metrics().await;
    let retries = metrics
        .lines()
        .find(|l| l.starts_with("tokengo_client_retries_total"))
        .unwrap_or("no retries metric");
    println!(
        "newcomer share: {newcomer_hits}/{total} = {:.1} % (honest exits: {honest_hits:?}; {retries})",
        share * 100.0
    );
    assert!(share <= 0.40, "newcomer took {:.1} %", share * 100.0);
    // Random, not frozen out either: the newcomer is used.
    assert!(newcomer_hits > 0);
}

/// A relay that lies, built in this test from the node's transport (not the node's relay): it
/// proves its own identity like any relay, answers the exit list with whatever signed
/// descriptors the test gives it, and counts requests it is asked to forward (answering "no
/// such exit").
struct LyingRelay {
    addr: RelayAddr,
    forwards: Arc<AtomicUsize>,
    stop: CancellationToken,
}

async fn start_lying_relay(list: Vec<Vec<u8>>) -> LyingRelay {
    let identity = Keypair::generate_ed25519();
    let endpoint =
        transport::server_endpoint("127.0.0.1:0".parse().unwrap(), &identity, params()).unwrap();
    let addr = RelayAddr::new(
        transport::dialable(endpoint.local_addr().unwrap()),
        identity.public().to_peer_id(),
    );
    let forwards = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (counter, cancelled) = (Arc::clone(&forwards), stop.clone());
    let list = Arc::new(list);
    tokio::spawn(async move {
        loop {
            let incoming = tokio::select! {
                () = cancelled.cancelled() => break,
                incoming = endpoint.accept() => incoming,
            };
            let Some(incoming) = incoming else { break };
            let (list, counter) = (Arc::clone(&list), Arc::clone(&counter));
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((mut send, recv)) = connection.accept_bi().await {
                    let (list, counter) = (Arc::clone(&list), Arc::clone(&counter));
                    tokio::spawn(async move {
                        let mut reader = StreamReader::new(recv);
                        let Ok(request) = reader
                            .decode(1024, Duration::from_secs(10), ClientRequest::decode)
                            .await
                        else {
                            return;
                        };
                        let answer = match request {
                            ClientRequest::ListExits => {
                                let refs: Vec<&[u8]> = list.iter().map(Vec::as_slice).collect();
                                let mut answer = vec![Status::Ok as u8];
                                answer.extend_from_slice(&frame::encode_exit_list(&refs));
                                answer
                            }
                            ClientRequest::Forward { .. } => {
                                counter.fetch_add(1, Ordering::SeqCst);
                                vec![Status::NoSuchExit as u8]
                            }
                        };
                        let _ = send.write_all(&answer).await;
                        let _ = send.finish();
                    });
                }
            });
        }
        endpoint.close(0u32.into(), b"done");
    });
    LyingRelay {
        addr,
        forwards,
        stop,
    }
}

/// The descriptor `relay` lists for `exit` now.
async fn current_descriptor(relay: &RelayAddr, exit: PeerId) -> Descriptor {
    let link = RelayLink::new(relay.clone(), params()).unwrap();
    let listed = list_exits(&link).await.unwrap();
    link.close().await;
    listed.into_iter().find(|d| d.peer_id == exit).unwrap()
}

/// `descriptor` with another key, issued `shift` seconds later (earlier when negative), signed
/// by the exit's own identity key: what a relay could serve if it kept an old descriptor, or
/// what a colluding exit could sign for one relay's clients only.
fn with_other_key(descriptor: &Descriptor, shift: i64, exit: &ExitHandle) -> Vec<u8> {
    let (identity, _) =
        tokengo::identity::load_or_create(&exit.dir.path().join("exit_identity.key")).unwrap();
    assert_eq!(identity.public().to_peer_id(), descriptor.peer_id);
    let issued_at = descriptor.issued_at.checked_add_signed(shift).unwrap();
    let other = Descriptor {
        key_configs: vec![KeyConfig {
            key_id: descriptor.key_configs[0].key_id.wrapping_add(1),
            public_key: [7; 32],
        }],
        issued_at,
        ..descriptor.clone()
    };
    SignedDescriptor::sign(&other, &identity)
        .unwrap()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_or_different_descriptor_from_another_relay_is_refused() {
    common::init();
    let relay = start_relay(&limits(), None).await;
    let target = recorded_exit(&[&relay.addr], Duration::ZERO).await;
    let bystander = recorded_exit(&[&relay.addr], Duration::ZERO).await;
    let current = current_descriptor(&relay.addr, target.exit.peer_id).await;
    for (case, shift, reason) in [
        ("stale (older issued_at, old key)", -600, "rollback"),
        ("different key, newer issued_at", 1, "rollback"),
        ("different key, same issued_at", 0, "key_conflict"),
    ] {
        let lying = start_lying_relay(vec![with_other_key(&current, shift, &target.exit)]).await;
        let target_before = target.backend.hits(CHAT);
        let bystander_before = bystander.backend.hits(CHAT);
        // Unpinned: the target exit is held; the bystander takes every request.
        let client = start_client(&[&relay.addr, &lying.addr], &[]).await;
        for _ in 0..10 {
            let (status, body) = client.chat(false).await;
            assert_eq!(status, 200, "{case}: {body}");
        }
        assert_eq!(target.backend.hits(CHAT), target_before, "{case}");
        assert_eq!(
            bystander.backend.hits(CHAT),
            bystander_before + 10,
            "{case}"
        );
        assert_eq!(lying.forwards.load(Ordering::SeqCst), 0, "{case}");
        let status = client.refreshed_status().await.client.unwrap();
        assert!(
            status
                .held_exits
                .iter()
                .any(|h| h.starts_with(&format!("{}:", target.exit.peer_id))
                    && h.ends_with(&format!("({reason})"))),
            "{case}: {:?}",
            status.held_exits
        );
        let metrics = client.metrics().await;
        let refused = metrics
            .lines()
            .find(|l| l.contains(&format!("descriptors_refused_total{{reason=\"{reason}\"}}")))
            .unwrap_or_else(|| panic!("{case}: no refusal metric in\n{metrics}"));
        assert!(!refused.ends_with(" 0"), "{case}: {refused}");
        assert!(!metrics.contains(&target.exit.peer_id.to_string()));

        // Pinned to the held exit: refused with a reason, never sent with either key.
        let pinned = start_client(&[&relay.addr, &lying.addr], &[target.exit.peer_id]).await;
        let (status, body) = pinned.chat(false).await;
        assert_eq!(status, 503, "{case}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("held"), "{case}: {message}");
        println!("{case}: {message}");
        assert_eq!(target.backend.hits(CHAT), target_before, "{case}");
        assert_eq!(lying.forwards.load(Ordering::SeqCst), 0, "{case}");
        lying.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_relay_refuses_a_foreign_exit() {
    common::init();
    let backend = common::start_recording_backend(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Process::start(&[
        "serve",
        "--backend",
        &backend.url,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--worker-threads",
        "1",
        "--data-dir",
        &dir.path().display().to_string(),
    ]);
    let admin = serve.line_after("admin endpoint on ").await;
    let serving = serve.line_after("tokengo serving on ").await;
    let url = serving.split(' ').next().unwrap().to_owned();
    let report: tokengo::status::StatusReport = reqwest::get(format!("{admin}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let relay = report.relay.unwrap();
    assert_eq!(relay.exits_registered, 1);
    let relay_addr: RelayAddr = relay.address.parse().unwrap();

    // Another local process with an exit identity of its own tries to join serve's relay.
    let foreign = common::start_recording_backend(Duration::ZERO).await;
    let foreign_dir = tempfile::tempdir().unwrap();
    let data_dir =
        tokengo::data_dir::DataDir::resolve(Some(foreign_dir.path().to_path_buf())).unwrap();
    let exit = tokengo::exit::Exit::load(
        &data_dir,
        &backend_config(&foreign.url, Duration::from_secs(10)),
        limits(),
    )
    .unwrap();
    let (registered, _) = tokio::sync::watch::channel(false);
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        exit.run(relay_addr, registered, CancellationToken::new()),
    )
    .await
    .expect("the foreign exit was neither refused nor stopped");
    let error = format!("{:#}", outcome.unwrap_err());
    assert!(error.contains("accepts only its own exit"), "{error}");
    let report: tokengo::status::StatusReport = reqwest::get(format!("{admin}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report.relay.unwrap().exits_registered, 1);
    // And serve still answers, through its own exit.
    let response = reqwest::Client::new()
        .post(format!("{url}{CHAT}"))
        .json(&serde_json::json!({"model": "test", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(backend.hits(CHAT), 1);
    assert_eq!(foreign.hits(CHAT), 0);
}
