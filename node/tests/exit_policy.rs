//! What an anonymous user can make an exit do, seen from a backend that records every request
//! reaching it: no management endpoint, no path outside the backend's base path, no header
//! that identifies the user's tool, no request from a foreign web page, no replay (minutes
//! later, or after the exit restarted), and no hidden cap on a slow non-streamed answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use common::{
    Backend, ClientHandle, ExitHandle, Recorder, RelayHandle, init, limits, raw_http,
    raw_http_with_head, start_backend, start_client, start_exit, start_exit_with, start_relay,
};
use libp2p_identity::Keypair;
use tokengo::{
    clock::Clock,
    config::{BackendConfig, Limits, RedactedHeaders},
    exit::EndpointPolicy,
    transport::{self, RelayAddr, TransportParams},
};
use tokengo_proto::frame::{ClientRequest, MediaType, Status};

/// The exit's backend at `base` (a path below the test backend) with the default endpoints.
fn default_policy(backend: &Backend, idle: Duration) -> BackendConfig {
    BackendConfig {
        url: format!("{}/base", backend.url).parse().unwrap(),
        headers: RedactedHeaders::default(),
        idle_timeout: idle,
        connect_timeout: Duration::from_secs(2),
        allow: EndpointPolicy::default(),
    }
}

struct Setup {
    backend: Backend,
    relay: RelayHandle,
    exit: ExitHandle,
    client: ClientHandle,
    recorder: Arc<Recorder>,
}

async fn setup(idle: Duration, clock: Clock) -> Setup {
    init();
    let backend = start_backend().await;
    let recorder = Arc::new(Recorder::default());
    let relay = start_relay(&limits(), Some(recorder.clone())).await;
    let exit = start_exit_with(
        &relay.addr,
        default_policy(&backend, idle),
        &limits(),
        tempfile::tempdir().unwrap(),
        clock,
    )
    .await;
    let client = start_client(&relay.addr, &limits()).await;
    // The exit's own model listing at start is not a user's request.
    backend.take_seen();
    Setup {
        backend,
        relay,
        exit,
        client,
        recorder,
    }
}

fn addr(client: &ClientHandle) -> String {
    client.url.trim_start_matches("http://").to_owned()
}

/// An HTTP/1.1 request to the client with `Host` set to its loopback address.
fn request(client: &ClientHandle, method: &str, target: &str, extra: &str) -> String {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\ncontent-type: application/json\r\n{extra}content-length: 2\r\nconnection: close\r\n\r\n{{}}",
        addr(client)
    )
}

fn code(body: &str) -> String {
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert!(json["error"]["message"].as_str().is_some(), "{body}");
    json["error"]["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn management_and_escaping_paths_never_reach_the_backend() {
    let s = setup(Duration::from_secs(30), Clock::system()).await;
    let endpoint = "endpoint_not_allowed";
    let path = "path_not_allowed";
    for (method, target, why) in [
        ("DELETE", "/api/delete", endpoint),
        ("POST", "/api/pull", endpoint),
        ("POST", "/api/create", endpoint),
        ("POST", "/api/copy", endpoint),
        ("POST", "/api/push", endpoint),
        ("POST", "/api/blobs/sha256:0123", endpoint),
        ("GET", "/slots", endpoint),
        ("POST", "/slots/0?action=erase", endpoint),
        ("POST", "/v1/load_lora_adapter", endpoint),
        ("GET", "/v1/files", endpoint),
        ("POST", "/v1/fine_tuning/jobs", endpoint),
        ("GET", "/v1/chat/completions", endpoint),
        ("POST", "/v1/../../admin", path),
        ("POST", "/v1/%2e%2e/%2e%2e/admin", path),
        ("POST", "/v1/%2E%2E/%2e%2E/admin", path),
        ("POST", "/v1/chat%2fcompletions", path),
        ("POST", "/v1//chat/completions", path),
        ("POST", "/v1/./chat/completions", path),
    ] {
        let (status, body) =
            raw_http(&addr(&s.client), &request(&s.client, method, target, "")).await;
        assert_eq!(status, 403, "{method} {target}: {body}");
        assert_eq!(code(&body), why, "{method} {target}");
    }
    assert!(
        s.backend.take_seen().is_empty(),
        "a refused request reached the backend"
    );
    // What is allowed arrives below the base path, as sent.
    for (method, target) in [
        ("POST", "/v1/chat/completions?api-version=1"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/org/model-1.5"),
        ("POST", "/api/chat"),
        ("GET", "/api/tags"),
    ] {
        let (status, body) =
            raw_http(&addr(&s.client), &request(&s.client, method, target, "")).await;
        assert_eq!(status, 200, "{method} {target}: {body}");
    }
    let seen: Vec<_> = s
        .backend
        .take_seen()
        .into_iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect();
    assert_eq!(
        seen,
        [
            "POST /base/v1/chat/completions?api-version=1",
            "GET /base/v1/models",
            "GET /base/v1/models/org/model-1.5",
            "POST /base/api/chat",
            "GET /base/api/tags",
        ]
    );
}

#[tokio::test]
async fn identifying_headers_never_reach_the_backend_and_the_operator_credential_wins() {
    init();
    let backend = start_backend().await;
    let relay = start_relay(&limits(), None).await;
    let mut config = default_policy(&backend, Duration::from_secs(30));
    config
        .headers
        .0
        .insert("authorization", "Bearer operator-key".parse().unwrap());
    let _exit = start_exit(&relay.addr, config, &limits()).await;
    let client = start_client(&relay.addr, &limits()).await;
    backend.take_seen();
    let identifying = [
        ("User-Agent", "OpenAI/Python 1.55.0"),
        ("OpenAI-Organization", "org-secret"),
        ("OpenAI-Project", "proj-secret"),
        ("X-Stainless-OS", "Linux"),
        ("X-Stainless-Arch", "x64"),
        ("X-Stainless-Runtime-Version", "3.12.1"),
        ("X-Stainless-Lang", "python"),
        ("Origin", "http://localhost:3000"),
        ("Referer", "http://localhost:3000/secret-chat"),
        ("x-api-key", "sk-ant-user-secret"),
        ("Authorization", "Bearer user-secret"),
        ("Accept-Language", "de-CH"),
        ("Cookie", "session=secret"),
        ("X-Forwarded-For", "198.51.100.7"),
        ("Forwarded", "for=198.51.100.7"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
    ];
    let extra: String = identifying
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect::<String>()
        + "OpenAI-Beta: assistants=v2\r\nanthropic-version: 2023-06-01\r\naccept: application/json\r\n";
    let (status, body) = raw_http(
        &addr(&client),
        &request(&client, "POST", "/v1/chat/completions", &extra),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = backend.take_seen();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0].headers;
    let get = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (name, _) in identifying {
        let name = name.to_ascii_lowercase();
        if name == "user-agent" || name == "authorization" {
            continue;
        }
        assert!(
            get(&name).is_empty(),
            "{name} reached the backend: {headers:?}"
        );
    }
    assert!(
        !headers.iter().any(|(_, v)| v.contains("secret")),
        "{headers:?}"
    );
    assert_eq!(
        get("user-agent"),
        [format!("tokengo/{}", env!("CARGO_PKG_VERSION")).as_str()]
    );
    assert_eq!(get("authorization"), ["Bearer operator-key"]);
    assert_eq!(get("openai-beta"), ["assistants=v2"]);
    assert_eq!(get("anthropic-version"), ["2023-06-01"]);
    assert_eq!(get("content-type"), ["application/json"]);
}

#[tokio::test]
async fn foreign_hosts_and_web_origins_are_refused() {
    let s = setup(Duration::from_secs(30), Clock::system()).await;
    let post = |host: &str, extra: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n{extra}content-length: 2\r\nconnection: close\r\n\r\n{{}}"
        )
    };
    let port = addr(&s.client).rsplit_once(':').unwrap().1.to_owned();
    for host in [
        "attacker.example",
        &format!("attacker.example:{port}"),
        "192.0.2.1",
    ] {
        let (status, body) = raw_http(&addr(&s.client), &post(host, "")).await;
        assert_eq!(status, 403, "{host}: {body}");
        assert_eq!(code(&body), "host_not_allowed");
    }
    for origin in ["https://attacker.example", "null"] {
        let (status, body) = raw_http(
            &addr(&s.client),
            &post(&addr(&s.client), &format!("Origin: {origin}\r\n")),
        )
        .await;
        assert_eq!(status, 403, "{origin}: {body}");
        assert_eq!(code(&body), "origin_not_allowed");
    }
    assert!(s.backend.take_seen().is_empty());
    for host in [addr(&s.client), format!("localhost:{port}")] {
        let (status, head, body) = raw_http_with_head(
            &addr(&s.client),
            &post(&host, "Origin: http://localhost:5173\r\n"),
        )
        .await;
        assert_eq!(status, 200, "{host}: {body}");
        // The page of an allowed origin may read the answer.
        assert!(
            head.contains("access-control-allow-origin: http://localhost:5173"),
            "{head}"
        );
    }
    assert_eq!(s.backend.take_seen().len(), 2);
    // CORS preflights are answered by the client: allowed for loopback origins, refused for
    // others; neither reaches the exit.
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nOrigin: {origin}\r\naccess-control-request-method: POST\r\naccess-control-request-headers: content-type\r\nconnection: close\r\n\r\n",
            addr(&s.client)
        )
    };
    let (status, head, _) =
        raw_http_with_head(&addr(&s.client), &preflight("http://localhost:5173")).await;
    assert_eq!(status, 204, "{head}");
    assert!(head.contains("access-control-allow-origin: http://localhost:5173"));
    assert!(head.contains("access-control-allow-headers: content-type"));
    let (status, body) = raw_http(&addr(&s.client), &preflight("https://attacker.example")).await;
    assert_eq!(status, 403);
    assert_eq!(code(&body), "origin_not_allowed");
    assert!(s.backend.take_seen().is_empty());
}

/// Sends `body` to the exit through the relay as a client would, and returns the answer.
async fn send_raw(relay: &RelayAddr, exit: libp2p_identity::PeerId, body: &[u8]) -> Vec<u8> {
    let endpoint = transport::client_endpoint(false).unwrap();
    let params = TransportParams {
        idle_timeout: Duration::from_secs(10),
        max_incoming_streams: 16,
        keep_alive: false,
    };
    let connection = transport::connect(
        &endpoint,
        &Keypair::generate_ed25519(),
        relay,
        tokengo_proto::frame::ALPN_CLIENT,
        params,
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    ClientRequest::Forward {
        exit_id: exit.to_bytes(),
        media: MediaType::Single,
    }
    .encode(&mut out);
    out.extend_from_slice(body);
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&out).await.unwrap();
    send.finish().unwrap();
    tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(1 << 24))
        .await
        .expect("no answer")
        .unwrap()
}

#[tokio::test]
async fn replays_are_refused_minutes_later_and_after_a_restart() {
    let offset = Arc::new(AtomicU64::new(0));
    let s = setup(Duration::from_secs(30), Clock::offset(Arc::clone(&offset))).await;
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{}/v1/chat/completions", s.client.url))
        .json(&serde_json::json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(s.backend.take_seen().len(), 1);
    // What the relay (or anyone on the path) recorded: the encapsulated request.
    // (After the relay's two-byte stream header to the exit.)
    let recorded = std::mem::take(&mut *s.recorder.to_exit.lock().unwrap());
    assert_eq!(recorded[1], MediaType::Single as u8);
    let recorded = recorded[2..].to_vec();
    // At once, 11 minutes later (the exit's clock moved), and after the exit restarted.
    // At once its `enc` is remembered: refused before decapsulation, with a status byte.
    let answer = send_raw(&s.relay.addr, s.exit.peer_id, &recorded).await;
    assert_eq!(
        answer,
        [Status::Undecryptable as u8],
        "refused before decapsulation"
    );
    offset.store(11 * 60, std::sync::atomic::Ordering::SeqCst);
    // Later the key may be forgotten (its date is outside the window): then it decapsulates
    // and the date check refuses it, encrypted.
    let answer = send_raw(&s.relay.addr, s.exit.peer_id, &recorded).await;
    assert!(
        answer == [Status::Undecryptable as u8]
            || answer[..2] == [tokengo_proto::frame::ACCEPTED, Status::Ok as u8],
        "{answer:?}"
    );
    assert!(
        s.backend.take_seen().is_empty(),
        "a replay reached the backend"
    );
    let errors = s.exit.probe.metrics().errors_total();
    assert!(errors >= 2, "refusals counted: {errors}");

    let peer = s.exit.peer_id;
    s.exit.stop.cancel();
    s.exit.task.await.unwrap().unwrap();
    let restarted = start_exit_with(
        &s.relay.addr,
        default_policy(&s.backend, Duration::from_secs(30)),
        &limits(),
        s.exit.dir,
        Clock::system(),
    )
    .await;
    assert_eq!(restarted.peer_id, peer, "same identity and keys");
    s.backend.take_seen();
    let answer = send_raw(&s.relay.addr, peer, &recorded).await;
    assert_eq!(
        answer[..2],
        [tokengo_proto::frame::ACCEPTED, Status::Ok as u8]
    );
    assert!(
        s.backend.take_seen().is_empty(),
        "a replay reached the backend after a restart"
    );
    // The restarted exit serves fresh requests.
    let response = http
        .post(format!("{}/v1/chat/completions", s.client.url))
        .json(&serde_json::json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(s.backend.take_seen().len(), 1);
}

#[tokio::test]
async fn a_non_streamed_answer_may_take_longer_than_the_idle_timeout() {
    // The backend sends its head only when the (simulated) generation ends, three idle
    // timeouts later: only the request timeout bounds that wait.
    init();
    let backend = start_backend().await;
    let relay = start_relay(&limits(), None).await;
    let mut config = common::backend_config(&backend.url, Duration::from_secs(1));
    config.idle_timeout = Duration::from_secs(1);
    let _exit = start_exit(&relay.addr, config, &limits()).await;
    let client = start_client(&relay.addr, &limits()).await;
    let response = reqwest::get(format!("{}/late?ms=3000", client.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"waited_ms":3000}"#);
    // And a request timeout shorter than the generation ends it with a timeout.
    let short = Limits {
        request_timeout: Duration::from_secs(1),
        ..limits()
    };
    let relay = start_relay(&short, None).await;
    let _exit = start_exit(
        &relay.addr,
        common::backend_config(&backend.url, Duration::from_secs(30)),
        &short,
    )
    .await;
    let client = start_client(&relay.addr, &short).await;
    let response = reqwest::get(format!("{}/late?ms=3000", client.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
}
