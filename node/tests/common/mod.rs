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
    RoleProbe, admin,
    client::{Client, ClientProbe},
    clock::Clock,
    config::{BackendConfig, Limits, RedactedHeaders},
    data_dir::DataDir,
    exit::{EndpointPolicy, Exit, ExitProbe},
    relay::{Direction, Registry, Relay, RelayProbe, Tap},
    transport::RelayAddr,
};
use tokio::sync::{Notify, watch};
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
    pub probe: RelayProbe,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

/// The defaults, except a 10 s tunnel liveness: the 2 s default detects a dead exit quickly
/// (the fault suite measures it on real processes), but on a loaded test machine (two cores,
/// test binaries and builds beside) a starved in-process exit can miss it and drop its
/// tunnel mid-test ("exit no longer registered"). Tests of detection set their own.
pub fn limits() -> Limits {
    Limits {
        tunnel_liveness: std::time::Duration::from_secs(10),
        ..Limits::default()
    }
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
    let probe = relay.probe();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    RelayHandle {
        addr,
        registry,
        probe,
        stop,
        task,
    }
}

/// The exit's backend settings for tests of the transport: every endpoint passes (`* /*`),
/// since the test backend's behaviours live on paths no inference API has (`/slow`,
/// `/held`). Tests of the endpoint policy use [`EndpointPolicy::default`] instead.
pub fn backend_config(url: &str, idle: Duration) -> BackendConfig {
    BackendConfig {
        url: url.parse().unwrap(),
        headers: RedactedHeaders::default(),
        idle_timeout: idle,
        connect_timeout: Duration::from_secs(2),
        allow: EndpointPolicy::new(vec!["* /*".parse().unwrap()], true),
    }
}

/// A running exit.
pub struct ExitHandle {
    pub peer_id: libp2p_identity::PeerId,
    pub probe: ExitProbe,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), tokengo::exit::TunnelError>>,
    pub registered: watch::Receiver<bool>,
    pub dir: tempfile::TempDir,
}

pub async fn start_exit(relay: &RelayAddr, backend: BackendConfig, limits: &Limits) -> ExitHandle {
    let dir = tempfile::tempdir().unwrap();
    start_exit_with(relay, backend, limits, dir, Clock::system()).await
}

/// An exit keeping its keys in `dir` (an earlier exit's, to restart it) and checking request
/// dates against `clock`.
pub async fn start_exit_with(
    relay: &RelayAddr,
    backend: BackendConfig,
    limits: &Limits,
    dir: tempfile::TempDir,
    clock: Clock,
) -> ExitHandle {
    let data_dir = DataDir::resolve(Some(dir.path().to_path_buf())).unwrap();
    let exit = Exit::load_with_clock(&data_dir, &backend, limits.clone(), clock).unwrap();
    let peer_id = exit.peer_id();
    let (tx, mut registered) = watch::channel(false);
    let probe = exit.probe(relay.clone(), tx.subscribe());
    let stop = CancellationToken::new();
    let task = tokio::spawn(exit.run(relay.clone(), tx, stop.clone()));
    tokio::time::timeout(Duration::from_secs(20), registered.wait_for(|r| *r))
        .await
        .expect("exit did not register in time")
        .unwrap();
    ExitHandle {
        peer_id,
        probe,
        stop,
        task,
        registered,
        dir,
    }
}

/// A running client; `url` is its HTTP base.
pub struct ClientHandle {
    pub url: String,
    pub probe: ClientProbe,
    /// The UDP address the client dials the relay from.
    pub quic_addr: SocketAddr,
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
    let probe = client.probe();
    let quic_addr = client.quic_local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(client.run(stop.clone()));
    ClientHandle {
        url,
        probe,
        quic_addr,
        stop,
        task,
    }
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
    /// Ends when the server has stopped (its port is closed).
    pub task: tokio::task::JoinHandle<()>,
    /// Releases the second event of `/held` streams.
    pub gate: Arc<Notify>,
    /// Every request the echo handler (all paths but `/slow`, `/big`, `/held`, `/late`) got.
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

/// A request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The path and query exactly as they arrived.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    fn of(request: &Request) -> Self {
        Self {
            method: request.method().to_string(),
            target: request
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            headers: request
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
        }
    }
}

impl Backend {
    /// What the echo handler got since the last call (and forgets it).
    pub fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    /// Requests for `path` (query aside) that reached this backend.
    pub fn hits(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.target.split('?').next() == Some(path))
            .count()
    }

    /// Stops the server and waits until its port no longer accepts connections.
    pub async fn shut_down(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
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

/// An SSE stream whose first event is sent at once and whose last waits until the test
/// releases `gate`: the stream is certainly in flight between the two.
async fn held(gate: Arc<Notify>) -> Response {
    let stream = futures_util::stream::unfold(0u32, move |i| {
        let gate = Arc::clone(&gate);
        async move {
            match i {
                0 => Some((Ok::<_, std::io::Error>(Bytes::from("data: first\n\n")), 1)),
                1 => {
                    gate.notified().await;
                    Some((Ok(Bytes::from("data: last\n\n")), 2))
                }
                _ => None,
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Answers after `ms` milliseconds with the whole (non-streamed) body: a model that sends its
/// response head only when generation ends.
async fn late(Query(params): Query<std::collections::HashMap<String, u64>>) -> Response {
    let ms = params.get("ms").copied().unwrap_or(1000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(format!("{{\"waited_ms\":{ms}}}")))
        .unwrap()
}

async fn big(Query(params): Query<std::collections::HashMap<String, usize>>) -> Response {
    let len = params.get("len").copied().unwrap_or(1 << 20);
    let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
    Response::new(Body::from(body))
}

pub async fn start_backend() -> Backend {
    let gate = Arc::new(Notify::new());
    let held_gate = Arc::clone(&gate);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Arc::clone(&seen);
    let router = Router::new()
        .route("/slow", any(slow))
        .route("/big", get(big))
        .route("/late", any(late))
        .route("/held", any(move || held(Arc::clone(&held_gate))))
        .fallback(move |request: Request| {
            recorder.lock().unwrap().push(Seen::of(&request));
            echo(request)
        });
    serve_backend(router, gate, seen).await
}

/// Serves `router` on a loopback port until the backend is stopped.
async fn serve_backend(router: Router, gate: Arc<Notify>, seen: Arc<Mutex<Vec<Seen>>>) -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let drain = stop.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { drain.cancelled().await })
            .await
            .unwrap();
    });
    Backend {
        url,
        stop,
        task,
        gate,
        seen,
    }
}

/// An echo backend that records the path of every request reaching it and answers after
/// `delay`: one per exit, so a test can count where requests went.
pub async fn start_recording_backend(delay: Duration) -> Backend {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let recorder = Arc::clone(&seen);
    let router = Router::new().fallback(move |request: Request| {
        let recorder = Arc::clone(&recorder);
        async move {
            recorder.lock().unwrap().push(Seen::of(&request));
            tokio::time::sleep(delay).await;
            echo(request).await
        }
    });
    serve_backend(router, Arc::new(Notify::new()), seen).await
}

/// A `tokengo` process whose output is read line by line (killed when dropped).
pub struct Process {
    pub child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Process {
    /// Starts `tokengo ARGS` with stdout piped (stderr goes to the test's output).
    pub fn start(args: &[&str]) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo"))
            .args(args)
            .env("TOKENGO_LOG_FORMAT", "text")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        Self {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// The rest of the first stdout line that starts with `prefix` (waits up to a minute,
    /// fails if the process exits first).
    pub async fn line_after(&mut self, prefix: &str) -> String {
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return rest.to_owned();
                }
            }
            panic!("tokengo exited before printing {prefix:?}");
        })
        .await;
        found.unwrap_or_else(|_| panic!("tokengo did not print {prefix:?} within a minute"))
    }
}

/// Sends `request` (a whole HTTP/1.1 request, sent byte for byte: no client library
/// normalises its path) to `addr` and returns the status and body of the answer.
pub async fn raw_http(addr: &str, request: &str) -> (u16, String) {
    let (status, _, body) = raw_http_with_head(addr, request).await;
    (status, body)
}

/// [`raw_http`], with the response head (status line and fields, lower case) too.
pub async fn raw_http_with_head(addr: &str, request: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {text}"));
    let (head, mut body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_ascii_lowercase(), b.to_owned()))
        .unwrap_or_default();
    if head.contains("transfer-encoding: chunked") {
        let mut plain = String::new();
        let mut rest = body.as_str();
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            plain.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        body = plain;
    }
    (status, head, body)
}

/// A `tokengo client` process; `url` is its HTTP base, `admin` its admin endpoint.
pub struct ClientProcess {
    pub url: String,
    pub admin: String,
    _process: Process,
    _dir: tempfile::TempDir,
}

/// Starts `tokengo client` on `relays` (one thread, its own data directory, HTTP and admin on
/// free loopback ports) with `args` added: pinned exits, tokens.
pub async fn start_client_process(relays: &[&RelayAddr], args: &[String]) -> ClientProcess {
    let dir = tempfile::tempdir().unwrap();
    let mut all: Vec<String> = [
        "client",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--worker-threads",
        "1",
        "--data-dir",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    all.push(dir.path().display().to_string());
    for relay in relays {
        all.extend(["--relay".to_owned(), relay.to_string()]);
    }
    all.extend_from_slice(args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut process = Process::start(&all);
    let admin = process.line_after("admin endpoint on ").await;
    let url = process.line_after("client listening on ").await;
    ClientProcess {
        url,
        admin,
        _process: process,
        _dir: dir,
    }
}

impl ClientProcess {
    /// A chat completion request, streamed (chunked OHTTP) or not: status and JSON body (the
    /// error, or what the echo backend received).
    pub async fn chat(&self, stream: bool) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&serde_json::json!({
                "model": "test",
                "stream": stream,
                "messages": [{"role": "user", "content": "who am I talking to?"}],
            }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// Makes the client fetch its relays' exit lists now (readiness does) and returns its
    /// `/status`.
    pub async fn refreshed_status(&self) -> tokengo::status::StatusReport {
        reqwest::get(format!("{}/readyz", self.admin))
            .await
            .unwrap();
        reqwest::get(format!("{}/status", self.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The client's metrics text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A running admin endpoint; `url` is its base.
pub struct Admin {
    pub url: String,
    pub stop: CancellationToken,
}

pub async fn start_admin(role: admin::Role, probes: Vec<RoleProbe>) -> Admin {
    let stop = CancellationToken::new();
    let handle = admin::start(
        Some("127.0.0.1:0".parse().unwrap()),
        role,
        probes,
        stop.clone(),
    )
    .await
    .unwrap();
    Admin {
        url: format!("http://{}", handle.local_addr().unwrap()),
        stop,
    }
}

impl Admin {
    /// `GET path`: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.url)).await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// The metrics, checked for the exposition's own syntax.
    pub async fn scrape(&self) -> Scrape {
        let response = reqwest::get(format!("{}/metrics", self.url)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text"),
        );
        Scrape::parse(&response.text().await.unwrap())
    }
}

/// Parsed OpenMetrics text: every sample by its series (`name{labels}` exactly as exposed).
pub struct Scrape {
    pub text: String,
    pub samples: std::collections::BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        assert!(text.ends_with("# EOF\n"), "no EOF marker:\n{text}");
        let mut samples = std::collections::BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "series twice: {series}"
            );
        }
        Self {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of a series, e.g. `tokengo_exit_requests_total{media="single"}`; the series
    /// must exist.
    pub fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in:\n{}", self.text))
    }
}

/// A loopback port with nothing listening (bound, then released).
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
