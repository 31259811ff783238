//! The admin endpoints of relay, exit and client as an operator (and Kubernetes) sees them:
//! metrics and readiness across a real request, a backend outage and an exit going away;
//! `/status` and `tokengo status`; and what the relay's logs never contain.
//!
//! Every check scrapes after an awaited event (a response read to its end, a backend whose
//! server task has ended, the relay's exit count seen through its watch channel): nothing
//! here waits for time to pass.
// Its helpers are plain functions, outside what clippy counts as tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Admin, Chain, Scrape, chain, limits, start_admin, start_backend};
use tokengo::{RoleProbe, admin::Role};

const PROMPT: &str = "SECRET-PROMPT-3f9d: the airspeed of an unladen swallow";

struct Admins {
    relay: Admin,
    exit: Admin,
    client: Admin,
}

/// One admin endpoint per role, as in a split deployment.
async fn admins(chain: &Chain) -> Admins {
    Admins {
        relay: start_admin(
            Role::Relay,
            vec![RoleProbe::Relay(chain.relay.probe.clone())],
        )
        .await,
        exit: start_admin(Role::Exit, vec![RoleProbe::Exit(chain.exit.probe.clone())]).await,
        client: start_admin(
            Role::Client,
            vec![RoleProbe::Client(chain.client.probe.clone())],
        )
        .await,
    }
}

async fn chat(url: &str, stream: bool) -> (u16, String) {
    let body = serde_json::json!({
        "model": "m",
        "stream": stream,
        "messages": [{"role": "user", "content": PROMPT}],
    });
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn metrics_and_readiness_follow_a_request_an_outage_and_an_exit_disconnect() {
    let backend = start_backend().await;
    let chain = chain(&backend.url, &limits(), Duration::from_secs(30), None).await;
    let admins = admins(&chain).await;

    // Everyone is alive and ready: the relay accepts, the exit is registered and its backend
    // answers, the client sees a usable exit.
    for admin in [&admins.relay, &admins.exit, &admins.client] {
        assert_eq!(admin.get("/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(admin.get("/readyz").await, (200, "ready\n".to_owned()));
    }
    let before = admins.client.scrape().await;
    assert_eq!(
        before.get("tokengo_client_requests_total{media=\"single\"}"),
        0.0
    );

    // One request of each kind, each read to its end.
    let (status, text) = chat(&chain.client.url, false).await;
    assert_eq!(status, 200);
    assert!(text.contains("SECRET-PROMPT-3f9d"));
    let (status, text) = chat(&chain.client.url, true).await;
    assert_eq!(status, 200);
    assert!(text.contains("SECRET-PROMPT-3f9d"));

    let relay = admins.relay.scrape().await;
    let exit = admins.exit.scrape().await;
    let client = admins.client.scrape().await;
    assert_eq!(relay.get("tokengo_relay_exits_registered"), 1.0);
    assert_eq!(relay.get("tokengo_relay_accepting"), 1.0);
    assert_eq!(
        relay.get("tokengo_relay_requests_total{kind=\"forward\"}"),
        2.0
    );
    assert_eq!(
        relay.get("tokengo_relay_exit_first_byte_seconds_count"),
        2.0
    );
    assert_eq!(
        relay.get("tokengo_relay_exit_registrations_total{outcome=\"new\"}"),
        1.0
    );
    for media in ["single", "chunked"] {
        let label = format!("{{media=\"{media}\"}}");
        assert_eq!(
            exit.get(&format!("tokengo_exit_requests_total{label}")),
            1.0
        );
        assert_eq!(
            client.get(&format!("tokengo_client_requests_total{label}")),
            1.0
        );
        // The overhead histograms got one observation each, at both ends, and it is
        // shorter than the whole request (the backend's time is subtracted).
        for (scrape, role) in [(&exit, "exit"), (&client, "client")] {
            let count = scrape.get(&format!(
                "tokengo_{role}_gateway_overhead_seconds_count{label}"
            ));
            assert_eq!(count, 1.0, "{role} {media}");
            let backend = scrape.get(&format!(
                "tokengo_{role}_backend_latency_seconds_count{label}"
            ));
            assert_eq!(backend, 1.0, "{role} {media}");
            let overhead = scrape.get(&format!(
                "tokengo_{role}_gateway_overhead_seconds_sum{label}"
            ));
            assert!((0.0..5.0).contains(&overhead), "{role} {media}: {overhead}");
        }
    }
    assert_eq!(
        exit.get("tokengo_exit_backend_responses_total{status_class=\"2xx\"}"),
        2.0
    );
    assert!(exit.get("tokengo_exit_forwarded_bytes_total{direction=\"to_backend\"}") > 100.0);
    assert!(exit.get("tokengo_exit_forwarded_bytes_total{direction=\"from_backend\"}") > 100.0);
    assert_eq!(exit.get("tokengo_exit_streams_in_flight"), 0.0);
    assert_eq!(exit.get("tokengo_exit_relay_connected"), 1.0);
    assert_eq!(exit.get("tokengo_exit_backend_up"), 1.0);
    assert!(exit.get("tokengo_exit_descriptor_expiry_timestamp_seconds") > 0.0);
    assert!(exit.text.contains(
        "tokengo_exit_ohttp_key_created_timestamp_seconds{key_id=\"1\",slot=\"current\"}"
    ));
    assert_eq!(client.get("tokengo_client_requests_in_flight"), 0.0);
    assert_eq!(
        client.get("tokengo_client_responses_total{status_class=\"2xx\"}"),
        2.0
    );
    assert_eq!(client.get("tokengo_client_relay_connected"), 1.0);
    assert_eq!(client.get("tokengo_client_exits_available"), 1.0);
    // Every encrypted byte the relay sent the client on request streams, the client counted.
    assert_eq!(
        relay.get("tokengo_relay_forwarded_bytes_total{direction=\"to_client\"}"),
        client.get("tokengo_client_forwarded_bytes_total{direction=\"from_relay\"}")
    );
    // No series anywhere carries the prompt, a path, the model, or an address.
    for scrape in [&relay, &exit, &client] {
        for needle in [
            "SECRET",
            "swallow",
            "chat/completions",
            "\"m\"",
            "127.0.0.1",
        ] {
            assert!(
                !scrape.text.contains(needle),
                "{needle} in:\n{}",
                scrape.text
            );
        }
    }

    // A stream that is certainly still running (its last event waits for the gate) counts as
    // in flight at all three roles.
    let mut held = reqwest::Client::new()
        .get(format!("{}/held", chain.client.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let first = held.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("first"));
    assert_eq!(
        admins
            .relay
            .scrape()
            .await
            .get("tokengo_relay_streams_in_flight"),
        1.0
    );
    assert_eq!(
        admins
            .exit
            .scrape()
            .await
            .get("tokengo_exit_streams_in_flight"),
        1.0
    );
    assert_eq!(
        admins
            .client
            .scrape()
            .await
            .get("tokengo_client_requests_in_flight"),
        1.0
    );
    backend.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = held.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&rest).contains("last"));
    assert_eq!(
        admins
            .exit
            .scrape()
            .await
            .get("tokengo_exit_streams_in_flight"),
        0.0
    );
    assert_eq!(
        admins
            .client
            .scrape()
            .await
            .get("tokengo_client_requests_in_flight"),
        0.0
    );

    // Backend outage: the exit stops being ready at once (readiness probes the backend), and
    // a request becomes a backend_unreachable error at the exit and a 502 for the user.
    backend.shut_down().await;
    let (status, reasons) = admins.exit.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(reasons.contains("backend unreachable"), "{reasons}");
    assert!(!reasons.contains("not registered"), "{reasons}");
    assert_eq!(admins.relay.get("/readyz").await.0, 200);
    assert_eq!(admins.client.get("/readyz").await.0, 200);
    let (status, text) = chat(&chain.client.url, false).await;
    assert_eq!(status, 502, "{text}");
    let exit = admins.exit.scrape().await;
    assert_eq!(exit.get("tokengo_exit_backend_up"), 0.0);
    assert_eq!(
        exit.get("tokengo_exit_errors_total{class=\"backend_unreachable\"}"),
        1.0
    );
    // An exit-made error has no backend time: the latency histograms did not move.
    assert_eq!(
        exit.get("tokengo_exit_backend_latency_seconds_count{media=\"single\"}"),
        1.0
    );
    let client = admins.client.scrape().await;
    assert_eq!(
        client.get("tokengo_client_responses_total{status_class=\"5xx\"}"),
        1.0
    );

    // Exit disconnect: the relay forgets it, the exit and the client stop being ready.
    let mut exits = chain.relay.registry.subscribe();
    chain.exit.stop.cancel();
    chain.exit.task.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), exits.wait_for(|n| *n == 0))
        .await
        .expect("relay kept a dead exit")
        .unwrap();
    assert_eq!(
        admins
            .relay
            .scrape()
            .await
            .get("tokengo_relay_exits_registered"),
        0.0
    );
    assert_eq!(admins.relay.get("/readyz").await.0, 200);
    let (status, reasons) = admins.exit.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(reasons.contains("not registered"), "{reasons}");
    assert_eq!(
        admins
            .exit
            .scrape()
            .await
            .get("tokengo_exit_relay_connected"),
        0.0
    );
    let (status, reasons) = admins.client.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(reasons.contains("no usable exit"), "{reasons}");
    assert_eq!(
        admins
            .client
            .scrape()
            .await
            .get("tokengo_client_exits_available"),
        0.0
    );
    let (status, _) = chat(&chain.client.url, false).await;
    assert_eq!(status, 503);
    let client = admins.client.scrape().await;
    assert_eq!(
        client.get("tokengo_client_errors_total{class=\"no_exit\"}"),
        1.0
    );
    // Liveness is unaffected by all of it.
    for admin in [&admins.relay, &admins.exit, &admins.client] {
        assert_eq!(admin.get("/healthz").await.0, 200);
    }
}

/// `/status` of a whole node (one admin endpoint for three roles, as `serve` has), and the
/// `tokengo status` command reading it.
#[tokio::test]
async fn status_reports_identities_keys_and_overhead_and_the_cli_prints_it() {
    let backend = start_backend().await;
    let chain = chain(&backend.url, &limits(), Duration::from_secs(30), None).await;
    let admin = start_admin(
        Role::Serve,
        vec![
            RoleProbe::Relay(chain.relay.probe.clone()),
            RoleProbe::Exit(chain.exit.probe.clone()),
            RoleProbe::Client(chain.client.probe.clone()),
        ],
    )
    .await;
    for stream in [false, true, false] {
        assert_eq!(chat(&chain.client.url, stream).await.0, 200);
    }
    let report = tokengo::status::fetch(&admin.url).await.unwrap();
    assert_eq!(report.role, "serve");
    assert!(report.ready, "{:?}", report.not_ready);
    let relay = report.relay.as_ref().unwrap();
    assert_eq!(relay.address, chain.relay.addr.to_string());
    assert_eq!(relay.exits_registered, 1);
    assert_eq!(relay.requests_total, 3);
    let exit = report.exit.as_ref().unwrap();
    assert_eq!(exit.peer_id, chain.exit.peer_id.to_string());
    assert!(exit.registered && exit.backend_up);
    assert_eq!(exit.keys.len(), 1);
    assert_eq!(
        (exit.keys[0].key_id, exit.keys[0].slot.as_str()),
        (1, "current")
    );
    assert!(exit.descriptor_expires_at.unwrap() > tokengo::clock::unix_now());
    assert_eq!(exit.requests_total, 3);
    assert_eq!(exit.gateway_overhead.count, 3);
    assert!(exit.gateway_overhead.p50_ms.unwrap() <= exit.gateway_overhead.p99_ms.unwrap());
    let client = report.client.as_ref().unwrap();
    assert!(client.relay_connected);
    assert_eq!(client.exits.len(), 1);
    assert_eq!(client.exits[0].peer_id, chain.exit.peer_id.to_string());
    assert_eq!(client.requests_total, 3);
    assert_eq!(client.gateway_overhead.count, 3);
    assert!(client.gateway_overhead.p99_ms.is_some());

    // The command an operator types.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo"))
        .args(["status", "--admin", &admin.url])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for needle in [
        "serve — ready",
        &chain.relay.addr.to_string(),
        &chain.exit.peer_id.to_string(),
        "1 exits registered",
        "keys 1 (current",
        "3 requests",
        "overhead p50",
        "1 exits usable",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing:\n{stdout}");
    }
    let json = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo"))
        .args(["status", "--json", "--admin", &admin.url])
        .output()
        .await
        .unwrap();
    let parsed: tokengo::status::StatusReport = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed.exit.unwrap().peer_id, chain.exit.peer_id.to_string());

    // Nothing listening: a clear error naming the flag that starts the endpoint.
    let closed = format!("http://{}", common::closed_port());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo"))
        .args(["status", "--admin", &closed])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--admin-listen"), "{stderr}");
}

/// Captures everything a subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// The relay runs on a thread of its own whose every log line is captured, with the node's
/// own log filter at its most verbose (`RUST_LOG=trace`, every library); client and exit run
/// elsewhere. Across single and streamed requests, an exit that goes away and a request for
/// it afterwards, the relay's logs never hold the client's address (so never pair it with an
/// exit id).
#[test]
fn relay_logs_never_name_a_client_address() {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _};
    tokengo::transport::install_crypto_provider();
    let logs = Captured::default();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(logs.clone())
            .with_filter(tokengo::logging::filter(
                tracing_subscriber::EnvFilter::new("trace"),
            )),
    );
    let (relay_tx, relay_rx) = std::sync::mpsc::channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let relay_stop = stop.clone();
    let relay_thread = std::thread::spawn(move || {
        tracing::subscriber::with_default(subscriber, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let relay = common::start_relay(&limits(), None).await;
                relay_tx
                    .send((relay.addr.clone(), relay.registry.subscribe()))
                    .unwrap();
                relay_stop.cancelled().await;
                relay.stop.cancel();
                relay.task.await.unwrap();
            });
        });
    });
    let (relay_addr, mut exits) = relay_rx.recv().unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (client_addr, exit_id) = runtime.block_on(async {
        let backend = start_backend().await;
        let exit = common::start_exit(
            &relay_addr,
            common::backend_config(&backend.url, Duration::from_secs(30)),
            &limits(),
        )
        .await;
        let client = common::start_client(&relay_addr, &limits()).await;
        for stream in [false, true] {
            let (status, text) = chat(&client.url, stream).await;
            assert_eq!(status, 200, "{text}");
        }
        // The exit goes away: the relay logs the disconnect, and the next request (for an
        // exit that is gone) fails at the relay.
        exit.stop.cancel();
        exit.task.await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(10), exits.wait_for(|n| *n == 0))
            .await
            .expect("relay kept a dead exit")
            .unwrap();
        let (status, _) = chat(&client.url, false).await;
        assert_eq!(status, 503);
        (client.quic_addr, exit.peer_id)
    });
    stop.cancel();
    relay_thread.join().unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // The capture saw the relay's work (an exit id, at registration), so its silence about
    // the client means something.
    assert!(
        text.contains(&exit_id.to_string()),
        "capture is empty:\n{text}"
    );
    assert!(text.contains("exit registered") && text.contains("exit disconnected"));
    // Library logs were captured too (QUIC at debug), not only the relay's own.
    assert!(text.contains("quinn_proto"), "{text}");
    let port = client_addr.port();
    for needle in [
        format!("127.0.0.1:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("0.0.0.0:{port}"),
    ] {
        if let Some(line) = text.lines().find(|l| l.contains(&needle)) {
            panic!("relay logged the client address {needle}: {line}");
        }
    }
    assert!(!text.contains("SECRET-PROMPT"));
}

/// Everything all three roles log at trace level (the node's own filter, every library) while
/// serving prompts, a backend credential, a user credential, a streamed answer that breaks and
/// a backend outage: no prompt, no answer, no path, no credential.
#[tokio::test]
async fn no_role_logs_prompts_answers_paths_or_secrets() {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _};
    let logs = Captured::default();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(logs.clone())
            .with_filter(tokengo::logging::filter(
                tracing_subscriber::EnvFilter::new("trace"),
            )),
    );
    // The current-thread test runtime runs every role's tasks on this thread.
    let _default = tracing::subscriber::set_default(subscriber);
    tokengo::transport::install_crypto_provider();
    let backend = start_backend().await;
    let limits = limits();
    let relay = common::start_relay(&limits, None).await;
    let mut config = common::backend_config(&backend.url, Duration::from_secs(30));
    let mut credential = http::HeaderValue::from_static("Bearer sk-BACKEND-SECRET-91");
    credential.set_sensitive(true);
    config
        .headers
        .0
        .insert(http::header::AUTHORIZATION, credential);
    let exit = common::start_exit(&relay.addr, config, &limits).await;
    let client = common::start_client(&relay.addr, &limits).await;
    let http = reqwest::Client::new();
    for stream in [false, true] {
        let response = http
            .post(format!("{}/v1/chat/completions?user=QUERY-SECRET", client.url))
            .header("authorization", "Bearer USER-SECRET-44")
            .json(&serde_json::json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response
                .text()
                .await
                .unwrap()
                .contains("SECRET-PROMPT-3f9d")
        );
    }
    let mut broken = http
        .post(format!(
            "{}/slow?events=6&interval_ms=10&fail_after=2",
            client.url
        ))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    while let Ok(Some(_)) = broken.chunk().await {}
    backend.shut_down().await;
    assert_eq!(chat(&client.url, false).await.0, 502);
    exit.stop.cancel();
    exit.task.await.unwrap().unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("backend stream failed mid-response") && text.contains("exit registered"),
        "capture missed the roles' logs:\n{text}"
    );
    for needle in [
        "SECRET",
        "swallow",
        "chat/completions",
        "/slow",
        "\"event\"",
        "Bearer",
    ] {
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            panic!("logged {needle:?}: {line}");
        }
    }
}

/// Scrape helper sanity: the parser refuses expositions without the EOF marker.
#[test]
#[should_panic(expected = "no EOF marker")]
fn scrape_parser_requires_eof() {
    let _ = Scrape::parse("tokengo_x 1\n");
}
