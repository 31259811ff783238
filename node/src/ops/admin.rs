//! The admin listener: a small HTTP server, separate from the user-facing endpoint and the
//! relay's QUIC port, for operators and Kubernetes probes. Off unless `--admin-listen` is
//! given; loopback is the expected address (a pod gives its own IP for kubelet probes).
//!
//! - `GET /metrics`: Prometheus metrics (OpenMetrics text) of every role the process runs.
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 when every role can do its job, else 503 with the reasons (readiness):
//!   relay: accepting connections; exit: registered with its relay and backend reachable;
//!   client: at least one usable exit.
//! - `GET /status`: a JSON [`StatusReport`] for `tokengo status`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::ops::{
    metrics::{ProcessInfo, RateWindow},
    status::StatusReport,
};

/// How often request counters are sampled for the per-minute rates in `/status`.
const RATE_SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Which command runs in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `tokengo relay`.
    Relay,
    /// `tokengo exit`.
    Exit,
    /// `tokengo client`.
    Client,
    /// `tokengo serve` (all three).
    Serve,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Exit => "exit",
            Self::Client => "client",
            Self::Serve => "serve",
        }
    }
}

/// What the admin listener asks of a running role. The wiring in `app` implements it for each
/// command's roles, so this module knows no role (and no role knows it).
pub trait Probe: Send + Sync + 'static {
    /// Why the role is not ready (empty when it is).
    fn not_ready(&self) -> impl Future<Output = Vec<String>> + Send;

    /// The role's DHT announcement in words, when it announces (not a readiness condition:
    /// a relay serves its configured clients whether strangers can find it or not).
    fn dht_note(&self) -> Option<String>;

    /// Registers the role's metrics.
    fn register(&self, registry: &mut Registry);

    /// Sets the gauges that mirror live state (connections that may have died since the
    /// last event, whether the backend answers) right before a scrape.
    fn refresh(&self) -> impl Future<Output = ()> + Send;

    /// Requests the role has handled, for the per-minute rate in `/status`.
    fn requests_total(&self) -> u64;

    /// Writes the role's part of `/status`, with its measured request rate.
    fn report(&self, requests_per_sec: Option<f64>, report: &mut StatusReport);
}

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The TCP port could not be bound.
    #[error(
        "cannot listen on {listen} for the admin endpoint: {source} (choose another with --admin-listen)"
    )]
    Bind {
        /// The address.
        listen: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

struct AdminState<P> {
    role: Role,
    probes: Vec<P>,
    registry: Registry,
    process: ProcessInfo,
    /// One per probe, same order.
    rates: Vec<RateWindow>,
}

impl<P> std::fmt::Debug for AdminState<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("role", &self.role)
            .field("probes", &self.probes.len())
            .finish_non_exhaustive()
    }
}

/// A running (or disabled) admin listener.
#[derive(Debug)]
pub struct AdminHandle {
    addr: Option<SocketAddr>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl AdminHandle {
    /// The bound address, if the listener is enabled.
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Waits until the listener has stopped (after the shutdown token fired).
    pub async fn stopped(self) {
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

/// Starts the admin listener on `listen` (nothing when `None`) for `probes`, until `shutdown`.
pub async fn start<P: Probe>(
    listen: Option<SocketAddr>,
    role: Role,
    probes: Vec<P>,
    shutdown: CancellationToken,
) -> Result<AdminHandle, AdminError> {
    let Some(listen) = listen else {
        return Ok(AdminHandle {
            addr: None,
            task: None,
        });
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| AdminError::Bind { listen, source })?;
    let addr = listener.local_addr().unwrap_or(listen);
    if !listen.ip().is_loopback() {
        tracing::warn!(%listen, "the admin endpoint is reachable from the network: /status shows this node's identities and relay addresses");
    }
    let mut registry = Registry::with_prefix("tokengo");
    let process = ProcessInfo::default();
    process.register(&mut registry);
    for probe in &probes {
        probe.register(&mut registry);
    }
    let rates = probes.iter().map(|_| RateWindow::default()).collect();
    let state = Arc::new(AdminState {
        role,
        probes,
        registry,
        process,
        rates,
    });
    let router = Router::new()
        .route("/metrics", get(metrics::<P>))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<P>))
        .route("/status", get(status::<P>))
        .with_state(Arc::clone(&state));
    // On stdout with the other lines a script acts on: with port 0 this is the only way to
    // learn the address.
    println!("admin endpoint on http://{addr}");
    let task = tokio::spawn(async move {
        let sampler = sample_rates(Arc::clone(&state), shutdown.clone());
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        let (_, served) = tokio::join!(sampler, server);
        if let Err(error) = served {
            tracing::warn!(%error, "admin endpoint failed");
        }
    });
    Ok(AdminHandle {
        addr: Some(addr),
        task: Some(task),
    })
}

async fn sample_rates<P: Probe>(state: Arc<AdminState<P>>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RATE_SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (probe, window) in state.probes.iter().zip(&state.rates) {
            window.record(probe.requests_total());
        }
    }
}

async fn metrics<P: Probe>(State(state): State<Arc<AdminState<P>>>) -> Response {
    for probe in &state.probes {
        probe.refresh().await;
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &state.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_ready<P: Probe>(state: &AdminState<P>) -> Vec<String> {
    let mut reasons = Vec::new();
    for probe in &state.probes {
        reasons.extend(probe.not_ready().await);
    }
    reasons
}

async fn readyz<P: Probe>(State(state): State<Arc<AdminState<P>>>) -> Response {
    let reasons = not_ready(&state).await;
    let notes: String = state
        .probes
        .iter()
        .filter_map(P::dht_note)
        .map(|note| format!("{note}\n"))
        .collect();
    if reasons.is_empty() {
        (StatusCode::OK, format!("ready\n{notes}")).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n{notes}", reasons.join("; ")),
        )
            .into_response()
    }
}

async fn status<P: Probe>(State(state): State<Arc<AdminState<P>>>) -> Response {
    let not_ready = not_ready(&state).await;
    let mut report = StatusReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        role: state.role.as_str().to_owned(),
        uptime_secs: state.process.uptime().as_secs(),
        ready: not_ready.is_empty(),
        not_ready,
        relay: None,
        exit: None,
        client: None,
    };
    for (probe, window) in state.probes.iter().zip(&state.rates) {
        probe.report(window.rate(probe.requests_total()), &mut report);
    }
    axum::Json(report).into_response()
}
