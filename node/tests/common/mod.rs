//! Shared harness for the node's integration tests: a whole chain (relay, exit, client) on
//! loopback in this process, over real QUIC and real OHTTP, plus a small HTTP backend with
//! behaviours the model server cannot be made to show on demand (echoing requests, streaming
//! slowly, failing mid-stream).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, Request},
    http::StatusCode,
    response::Response,
    routing::{any, get},
};
use tokengo::{
    client::Client,
    config::{BackendConfig, Limits, RedactedHeaders},
    data_dir::DataDir,
    exit::Exit,
    relay::{Direction, Registry, Relay, Tap},
    transport::RelayAddr,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Installs the crypto provider and a test log subscriber once.
pub fn init() {
    tokengo::transport::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Every byte the relay forwarded.
#[derive(Debug, Default)]
pub struct Recorder {
    pub to_exit: Mutex<Vec<u8>>,
    pub to_client: Mutex<Vec<u8>>,
}

impl Tap for Recorder {
    fn forwarded(&self, direction: Direction, bytes: &[u8]) {
        let target = match direction {
            Direction::ToExit => &self.to_exit,
            Direction::ToClient => &self.to_client,
        };
        target.lock().unwrap().extend_from_slice(bytes);
    }
}

/// A running relay.
pub struct RelayHandle {
    pub addr: RelayAddr,
    pub registry: Arc<Registry>,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

pub fn limits() -> Limits {
    Limits::default()
}

pub async fn start_relay(limits: &Limits, tap: Option<Arc<dyn Tap>>) -> RelayHandle {
    let identity = libp2p_identity::Keypair::generate_ed25519();
    start_relay_with(&identity, "127.0.0.1:0".parse().unwrap(), limits, tap).await
}

pub async fn start_relay_with(
    identity: &libp2p_identity::Keypair,
    listen: SocketAddr,
    limits: &Limits,
    tap: Option<Arc<dyn Tap>>,
) -> RelayHandle {
    let mut relay = Relay::bind(listen, identity, limits).unwrap();
    if let Some(tap) = tap {
        relay = relay.with_tap(tap);
    }
    let addr = relay.addr().clone();
    let registry = relay.registry();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    RelayHandle {
        addr,
        registry,
        stop,
        task,
    }
}

pub fn backend_config(url: &str, idle: Duration) -> BackendConfig {
    BackendConfig {
        url: url.parse().unwrap(),
        headers: RedactedHeaders::default(),
        idle_timeout: idle,
        connect_timeout: Duration::from_secs(2),
    }
}

/// A running exit.
pub struct ExitHandle {
    pub peer_id: libp2p_identity::PeerId,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub registered: watch::Receiver<bool>,
    pub dir: tempfile::TempDir,
}

pub async fn start_exit(relay: &RelayAddr, backend: BackendConfig, limits: &Limits) -> ExitHandle {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = DataDir::resolve(Some(dir.path().to_path_buf())).unwrap();
    let exit = Exit::load(&data_dir, &backend, limits.clone()).unwrap();
    let peer_id = exit.peer_id();
    let (tx, mut registered) = watch::channel(false);
    let stop = CancellationToken::new();
    let task = tokio::spawn(exit.run(relay.clone(), tx, stop.clone()));
    tokio::time::timeout(Duration::from_secs(20), registered.wait_for(|r| *r))
        .await
        .expect("exit did not register in time")
        .unwrap();
    ExitHandle {
        peer_id,
        stop,
        task,
        registered,
        dir,
    }
}

/// A running client; `url` is its HTTP base.
pub struct ClientHandle {
    pub url: String,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn start_client(relay: &RelayAddr, limits: &Limits) -> ClientHandle {
    let client = Client::bind(
        "127.0.0.1:0".parse().unwrap(),
        relay.clone(),
        limits.clone(),
    )
    .await
    .unwrap();
    client.check_relay().await.unwrap();
    let url = format!("http://{}", client.local_addr());
    let stop = CancellationToken::new();
    let task = tokio::spawn(client.run(stop.clone()));
    ClientHandle { url, stop, task }
}

/// Relay, exit and client wired together.
pub struct Chain {
    pub relay: RelayHandle,
    pub exit: ExitHandle,
    pub client: ClientHandle,
}

pub async fn chain(
    backend_url: &str,
    limits: &Limits,
    idle: Duration,
    tap: Option<Arc<dyn Tap>>,
) -> Chain {
    init();
    let relay = start_relay(limits, tap).await;
    let exit = start_exit(&relay.addr, backend_config(backend_url, idle), limits).await;
    let client = start_client(&relay.addr, limits).await;
    Chain {
        relay,
        exit,
        client,
    }
}

/// The test backend: an HTTP server on loopback.
pub struct Backend {
    pub url: String,
    pub stop: CancellationToken,
}

#[derive(serde::Deserialize)]
struct SlowParams {
    events: u32,
    interval_ms: u64,
    #[serde(default)]
    fail_after: Option<u32>,
}

/// Echoes the request it got as JSON: method, path, query, headers (repeated ones as lists)
/// and body; status from `?status=` and a repeated response header.
async fn echo(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<_> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| serde_json::Value::from(v.to_str().unwrap_or("")))
            .collect();
        headers.insert(name.as_str().to_owned(), values.into());
    }
    let status = parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("status=")))
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "body_len": body.len(),
    });
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .header("x-echo", "one")
        .header("x-echo", "two")
        .body(Body::from(json.to_string()))
        .unwrap()
}

/// Streams `events` SSE events, one every `interval_ms`; with `fail_after`, aborts the
/// connection after that many events (a backend dying mid-generation).
async fn slow(Query(params): Query<SlowParams>) -> Response {
    let stream = futures_util::stream::unfold(0u32, move |i| async move {
        if i >= params.events {
            return None;
        }
        if params.fail_after == Some(i) {
            return Some((Err(std::io::Error::other("backend died")), i + 1));
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(params.interval_ms)).await;
        }
        let event = Bytes::from(format!("data: {{\"event\":{i}}}\n\n"));
        Some((Ok::<_, std::io::Error>(event), i + 1))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn big(Query(params): Query<std::collections::HashMap<String, usize>>) -> Response {
    let len = params.get("len").copied().unwrap_or(1 << 20);
    let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
    Response::new(Body::from(body))
}

pub async fn start_backend() -> Backend {
    let router = Router::new()
        .route("/slow", any(slow))
        .route("/big", get(big))
        .fallback(echo);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let drain = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { drain.cancelled().await })
            .await
            .unwrap();
    });
    Backend { url, stop }
}

/// A loopback port with nothing listening (bound, then released).
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
