//! The client: a local OpenAI-compatible HTTP endpoint that encrypts every request to an exit
//! and sends it through the relay.

mod access;
mod body;
mod directory;
mod proxy;
mod relay_link;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

pub use access::ClientPolicy;
pub use directory::{Directory, ExitInfo};
pub use relay_link::RelayLink;

use crate::{
    admin::{self, RoleProbe},
    api_error::ApiError,
    config::{ClientConfig, Limits},
    metrics::ClientMetrics,
    status::{ClientStatus, ExitSummary},
    transport::{ConnectError, RelayAddr, TransportParams},
};

/// Shared by all request handlers.
#[derive(Debug)]
pub struct ClientState {
    link: RelayLink,
    directory: Directory,
    limits: Limits,
    /// Which local requests are answered and which headers forwarded.
    policy: ClientPolicy,
    metrics: Arc<ClientMetrics>,
}

/// Runs `tokengo client` until shutdown. Without a configured relay, relays are discovered on
/// the DHT (and the relay cache in the data directory) first.
pub async fn run(config: ClientConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dht = crate::metrics::DhtMetrics::default();
    let relays = match config.relay {
        Some(relay) => vec![relay],
        None => {
            config.data_dir.ensure()?;
            let seek = crate::discovery::Seek {
                cache: Some(crate::discovery::RelayCache::new(
                    config.data_dir.file(crate::discovery::CACHE_FILE),
                )),
                want: crate::discovery::CLIENT_RELAYS,
                settle: crate::discovery::DEFAULT_SETTLE,
                params: transport_params(&config.limits),
                guard: crate::discovery::DialGuard {
                    refused: dht.dials_refused.clone(),
                    observer: None,
                },
                metrics: dht.clone(),
            };
            let found = crate::discovery::discover(&config.dht, seek, &shutdown).await;
            crate::discovery::or_fallback(found, &config.fallback_relays)?
                .into_iter()
                .take(crate::discovery::CLIENT_RELAYS)
                .collect()
        }
    };
    let client =
        Client::bind_with(config.listen, relays, config.limits, config.policy, dht).await?;
    client.check_relay().await?;
    let admin = admin::start(
        config.observability.admin_listen,
        admin::Role::Client,
        vec![RoleProbe::Client(client.probe())],
        shutdown.clone(),
    )
    .await?;
    println!("client listening on http://{}", client.local_addr());
    let result = client.run(shutdown.clone()).await;
    shutdown.cancel();
    admin.stopped().await;
    result
}

/// What the admin listener reads from a running client: readiness, status and metrics.
#[derive(Debug, Clone)]
pub struct ClientProbe {
    state: Arc<ClientState>,
}

impl ClientProbe {
    /// The client's metrics.
    #[must_use]
    pub fn metrics(&self) -> &ClientMetrics {
        &self.state.metrics
    }

    /// Why the client is not ready: it is ready when the relay lists at least one exit whose
    /// descriptor verifies. The list is fetched now, so an exit that went away shows at once.
    pub async fn not_ready(&self) -> Vec<String> {
        let outcome = self.state.directory.refresh(&self.state.link).await;
        self.refresh();
        match outcome {
            Ok(exits) if exits.is_empty() => vec!["client: no usable exit".to_owned()],
            Ok(_) => Vec::new(),
            Err(error) => vec![format!("client: {error}")],
        }
    }

    /// Mirrors the relay connection and the exit list into their gauges.
    pub fn refresh(&self) {
        let metrics = &self.state.metrics;
        metrics
            .relay_connected
            .set(i64::from(self.state.link.is_connected()));
        metrics
            .exits_available
            .set(i64::try_from(self.state.directory.current().len()).unwrap_or(i64::MAX));
    }

    /// The client's part of `/status`.
    #[must_use]
    pub fn status(&self, requests_per_sec: Option<f64>) -> ClientStatus {
        let metrics = &self.state.metrics;
        ClientStatus {
            relay: self.state.link.relay().to_string(),
            relay_connected: self.state.link.is_connected(),
            exits: self
                .state
                .directory
                .current()
                .iter()
                .map(|exit| ExitSummary {
                    peer_id: exit.peer_id.to_string(),
                    key_id: exit.key_config.key_id,
                })
                .collect(),
            requests_total: metrics.requests_total(),
            requests_per_sec,
            errors_total: metrics.errors_total(),
            requests_in_flight: metrics.requests_in_flight.get(),
            gateway_overhead: (&metrics.overhead()).into(),
            backend_latency: (&metrics.backend()).into(),
        }
    }
}

/// A bound client endpoint.
#[derive(Debug)]
pub struct Client {
    listener: tokio::net::TcpListener,
    state: Arc<ClientState>,
}

impl Client {
    /// Binds the local HTTP listener; the relay is dialled on first use.
    pub async fn bind(
        listen: SocketAddr,
        relay: RelayAddr,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        Self::bind_with(
            listen,
            vec![relay],
            limits,
            ClientPolicy::default(),
            crate::metrics::DhtMetrics::default(),
        )
        .await
    }

    /// Binds the local HTTP listener for `relays` (best first, failing over in order); the
    /// first is dialled on first use. `policy` says which local requests are answered; `dht`
    /// are the metrics discovery filled in.
    pub async fn bind_with(
        listen: SocketAddr,
        relays: Vec<RelayAddr>,
        limits: Limits,
        policy: ClientPolicy,
        dht: crate::metrics::DhtMetrics,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| {
            format!("cannot listen on {listen} (is something else using it? choose another with --listen)")
        })?;
        if !listen.ip().is_loopback() {
            tracing::warn!(%listen, "the endpoint is reachable from the network: anyone who can reach it can use your exits");
        }
        let link = RelayLink::with_failover(relays, transport_params(&limits))
            .context("binding a UDP socket")?;
        let mut metrics = ClientMetrics::new();
        metrics.dht = dht;
        Ok(Self {
            listener,
            state: Arc::new(ClientState {
                link,
                directory: Directory::default(),
                limits,
                policy,
                metrics: Arc::new(metrics),
            }),
        })
    }

    /// The handle the admin listener reads.
    #[must_use]
    pub fn probe(&self) -> ClientProbe {
        ClientProbe {
            state: Arc::clone(&self.state),
        }
    }

    /// The local UDP address the client dials the relay from (the address the relay sees,
    /// with the host's IP); for tests that check what the relay logs.
    #[must_use]
    pub fn quic_local_addr(&self) -> Option<SocketAddr> {
        self.state.link.local_addr()
    }

    /// The bound HTTP address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Dials the relay and fetches the exit list once, so a wrong relay identity stops the
    /// client at start with a clear message. An unreachable relay is only a warning: requests
    /// retry it.
    pub async fn check_relay(&self) -> anyhow::Result<()> {
        match self.state.link.connection().await {
            Err(error @ (ConnectError::WrongPeer { .. } | ConnectError::Tls(_)))
                if self.state.link.relays().len() == 1 =>
            {
                return Err(error).context("refusing to use this relay");
            }
            Err(error) => {
                tracing::warn!(%error, "relay not reachable yet; requests will retry it");
                return Ok(());
            }
            Ok(_) => {}
        }
        match self.state.directory.refresh(&self.state.link).await {
            Ok(exits) if exits.is_empty() => {
                tracing::warn!(relay = %self.state.link.relay(), "the relay has no exits registered yet");
            }
            Ok(exits) => tracing::info!(exits = exits.len(), "exits available"),
            Err(error) => tracing::warn!(%error, "cannot fetch exit list yet"),
        }
        Ok(())
    }

    /// Serves HTTP until `shutdown`, then lets requests in flight finish.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let router = axum::Router::new()
            .fallback(proxy::handle)
            .with_state(Arc::clone(&self.state));
        let drain = shutdown.clone();
        // TCP_NODELAY on every accepted connection: a streamed response is written as a head
        // and then one write per event, and with Nagle's algorithm each small write after the
        // first waits for the user's tool to acknowledge the previous one, which a delayed ACK
        // holds back by up to 40 ms.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { drain.cancelled().await })
            .await
            .context("HTTP server failed")?;
        // Give the QUIC connection a moment to say goodbye; never block shutdown on it.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.state.link.close()).await;
        Ok(())
    }
}

/// QUIC parameters of a client's relay connection.
fn transport_params(limits: &Limits) -> TransportParams {
    TransportParams {
        idle_timeout: limits.quic_idle_timeout,
        max_incoming_streams: 0,
        keep_alive: true,
    }
}

/// Maps a failure before any exit was reached to the user's HTTP error.
#[must_use]
pub fn error_response(error: &ApiError) -> axum::response::Response {
    proxy::error_response(error)
}
