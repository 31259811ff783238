//! The client: a local OpenAI-compatible HTTP endpoint that encrypts every request to an exit
//! and sends it through the relay.

mod access;
mod body;
mod choice;
pub mod config;
mod directory;
mod exit_set;
mod proxy;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use libp2p_identity::PeerId;
use tokio_util::sync::CancellationToken;

use self::config::ClientConfig;
pub use access::ClientPolicy;
pub use directory::{Directory, ExitInfo, ExitView, Route};

use crate::{
    config::{
        Limits,
        defaults::{REDISCOVER_MAX, REDISCOVER_MIN},
    },
    net::transport::{ConnectError, RelayAddr, TransportParams},
    ops::metrics::ClientMetrics,
    ops::status::{ClientStatus, ExitSummary, RelaySummary},
    roles::access::ExitTokens,
    web::api_error::ApiError,
};

/// Shared by all request handlers.
#[derive(Debug)]
pub struct ClientState {
    directory: Directory,
    limits: Limits,
    /// Which local requests are answered and which headers forwarded.
    policy: ClientPolicy,
    metrics: Arc<ClientMetrics>,
}

/// Starts `tokengo client`: without a configured relay, relays are discovered on the DHT (and
/// the relay cache in the data directory) first; then the endpoint is bound and a relay
/// checked. The background lookups it starts stop at `shutdown`.
pub async fn start(config: ClientConfig, shutdown: &CancellationToken) -> anyhow::Result<Client> {
    let dht = crate::ops::metrics::DhtMetrics::default();
    // Without configured relays the client discovers: relays, and exits on the DHT.
    let discovering = config.relays.is_empty();
    let relays = if discovering {
        config.data_dir.ensure()?;
        let seek = crate::net::discovery::Seek::new(
            Some(crate::net::discovery::RelayCache::in_dir(&config.data_dir)),
            crate::net::discovery::CLIENT_RELAYS,
            crate::net::discovery::settle_for(&config.dht),
            transport_params(&config.limits),
            &dht,
        );
        let found = crate::net::discovery::discover(&config.dht, seek, shutdown).await;
        crate::net::discovery::or_fallback(found, &config.fallback_relays)?
            .into_iter()
            .take(crate::net::discovery::CLIENT_RELAYS)
            .collect()
    } else {
        config.relays
    };
    if !config.exits.is_empty() {
        let pinned: Vec<String> = config.exits.iter().map(ToString::to_string).collect();
        tracing::info!(exits = %pinned.join(", "), "requests go only to the pinned exits");
    }
    let guard = crate::net::discovery::DialGuard {
        refused: dht.dials_refused.clone(),
        observer: None,
    };
    let params = transport_params(&config.limits);
    let client = Client::bind_pinned(
        config.listen,
        relays,
        config.exits,
        config.exit_tokens,
        config.limits,
        config.policy,
        dht,
    )
    .await?;
    if discovering {
        tokio::spawn(look_up_exits(
            config.dht.clone(),
            guard,
            client.exit_feed(),
            shutdown.clone(),
        ));
        let seek = crate::net::discovery::Seek::new(
            Some(crate::net::discovery::RelayCache::in_dir(&config.data_dir)),
            crate::net::discovery::CLIENT_RELAYS,
            crate::net::discovery::DEFAULT_SETTLE,
            params,
            &client.state.metrics.dht,
        );
        tokio::spawn(rediscover_relays(
            config.dht.clone(),
            seek,
            config.fallback_relays.clone(),
            Arc::clone(&client.state),
            shutdown.clone(),
        ));
    }
    client.check_relay().await?;
    Ok(client)
}

/// Serves a started client's endpoint until shutdown.
pub async fn serve(client: Client, shutdown: CancellationToken) -> anyhow::Result<()> {
    println!("client listening on http://{}", client.local_addr());
    client.run(shutdown).await
}

/// How often a discovering client looks exits up on the DHT again.
const EXIT_LOOKUP_EVERY: Duration = Duration::from_secs(600);

/// Looks exits up on the DHT now and every [`EXIT_LOOKUP_EVERY`], as one more source for the
/// client's exit set (the relays' lists serve meanwhile). A failed lookup keeps the last one's
/// results.
async fn look_up_exits(
    dht: crate::net::discovery::DhtConfig,
    guard: crate::net::discovery::DialGuard,
    feed: ExitFeed,
    shutdown: CancellationToken,
) {
    loop {
        let lookup = crate::net::discovery::ExitLookup {
            guard: guard.clone(),
            ..crate::net::discovery::ExitLookup::default()
        };
        match crate::net::discovery::find_exits(&dht, lookup, &shutdown).await {
            Ok(found) => {
                tracing::info!(exits = found.len(), "exits found on the DHT");
                feed.learn_from_dht(found);
            }
            Err(crate::net::discovery::DiscoveryError::Cancelled) => return,
            Err(error) => {
                tracing::warn!(%error, "exit lookup on the DHT failed; the relays' lists still serve");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(EXIT_LOOKUP_EVERY) => {}
        }
    }
}

/// How often a discovering client checks whether all its relays failed.
const RELAY_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Discovers relays again whenever every relay the client has failed (their lists cannot be
/// fetched, or requests cannot reach them), and uses what verified instead (the relay cache
/// is rewritten with it). Backs off while discovery finds nothing that helps.
async fn rediscover_relays(
    dht: crate::net::discovery::DhtConfig,
    seek: crate::net::discovery::Seek,
    fallback: Vec<RelayAddr>,
    state: Arc<ClientState>,
    shutdown: CancellationToken,
) {
    let mut wait = REDISCOVER_MIN;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RELAY_CHECK_EVERY) => {}
        }
        if !state.directory.relays_down() {
            wait = REDISCOVER_MIN;
            continue;
        }
        tracing::warn!("every relay failed; discovering relays again");
        let found = crate::net::discovery::discover(&dht, seek.clone(), &shutdown).await;
        match crate::net::discovery::or_fallback(found, &fallback) {
            Ok(relays) if !relays.is_empty() => {
                tracing::info!(relays = relays.len(), "using newly discovered relays");
                state.directory.replace_relays(&relays);
                // The new relays' lists are fetched now, so the next check sees them.
                if let Err(error) = state.directory.refresh().await {
                    tracing::warn!(%error, "the newly discovered relays do not answer yet");
                }
            }
            Ok(_) => {}
            Err(crate::net::discovery::DiscoveryError::Cancelled) => return,
            Err(error) => tracing::warn!(%error, "no relay found; trying again later"),
        }
        if state.directory.relays_down() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(REDISCOVER_MAX);
        } else {
            wait = REDISCOVER_MIN;
        }
    }
}

/// Where exits learned outside the relays' lists go (the DHT lookup).
#[derive(Debug, Clone)]
pub struct ExitFeed {
    state: Arc<ClientState>,
}

impl ExitFeed {
    /// Takes a DHT lookup's exits as the DHT's claims (see [`Directory::learn_from_dht`]).
    pub fn learn_from_dht(&self, found: Vec<crate::net::discovery::FoundExit>) {
        self.state.directory.learn_from_dht(
            found
                .into_iter()
                .map(|exit| (exit.descriptor, exit.relays))
                .collect(),
        );
    }
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

    /// Why the client is not ready: it is ready when at least one exit it may use (pinned,
    /// when pinning) is listed with a verified, consistent descriptor. The lists are fetched
    /// now, so an exit that went away shows at once.
    pub async fn not_ready(&self) -> Vec<String> {
        let outcome = self.state.directory.refresh().await;
        self.refresh();
        match outcome {
            Ok(0) if !self.state.directory.pinned().is_empty() => {
                vec!["client: no pinned exit is listed by a relay".to_owned()]
            }
            Ok(0) => vec!["client: no usable exit".to_owned()],
            Ok(_) => Vec::new(),
            Err(error) => vec![format!("client: {error}")],
        }
    }

    /// Mirrors the relay connections and the exits into their gauges.
    pub fn refresh(&self) {
        let metrics = &self.state.metrics;
        let connected = self
            .state
            .directory
            .links()
            .iter()
            .any(|link| link.is_connected());
        metrics.relay_connected.set(i64::from(connected));
        metrics
            .exits_available
            .set(i64::try_from(self.state.directory.current().len()).unwrap_or(i64::MAX));
    }

    /// The client's part of `/status`.
    #[must_use]
    pub fn status(&self, requests_per_sec: Option<f64>) -> ClientStatus {
        let metrics = &self.state.metrics;
        let directory = &self.state.directory;
        let links = directory.links();
        ClientStatus {
            relay: links
                .iter()
                .map(|link| link.relay().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            relay_connected: links.iter().any(|link| link.is_connected()),
            relays: links
                .iter()
                .map(|link| RelaySummary {
                    address: link.relay().to_string(),
                    connected: link.is_connected(),
                })
                .collect(),
            pinned_exits: directory.pinned().iter().map(ToString::to_string).collect(),
            exits: directory
                .current()
                .into_iter()
                .map(|view| ExitSummary {
                    peer_id: view.exit.peer_id.to_string(),
                    key_id: view.exit.key_config.key_id,
                    vouched_by: view.vouched_by,
                    access_token_required: view.access_token_required,
                    token_configured: view.token_configured,
                })
                .collect(),
            held_exits: directory.held(),
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
        Self::bind_pinned(
            listen,
            vec![relay],
            Vec::new(),
            ExitTokens::default(),
            limits,
            ClientPolicy::default(),
            crate::ops::metrics::DhtMetrics::default(),
        )
        .await
    }

    /// Binds the local HTTP listener for `relays` (each exit's route takes one that hosts it);
    /// `policy` says which local requests are answered; `dht` are the metrics discovery filled
    /// in.
    pub async fn bind_with(
        listen: SocketAddr,
        relays: Vec<RelayAddr>,
        limits: Limits,
        policy: ClientPolicy,
        dht: crate::ops::metrics::DhtMetrics,
    ) -> anyhow::Result<Self> {
        Self::bind_pinned(
            listen,
            relays,
            Vec::new(),
            ExitTokens::default(),
            limits,
            policy,
            dht,
        )
        .await
    }

    /// Binds the local HTTP listener for `relays`, sending requests only to the `pinned`
    /// exits when that is not empty (whatever any relay lists), with `tokens` for exits that
    /// require an access token.
    pub async fn bind_pinned(
        listen: SocketAddr,
        relays: Vec<RelayAddr>,
        pinned: Vec<PeerId>,
        tokens: ExitTokens,
        limits: Limits,
        policy: ClientPolicy,
        dht: crate::ops::metrics::DhtMetrics,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| {
            format!("cannot listen on {listen} (is something else using it? choose another with --listen)")
        })?;
        if !listen.ip().is_loopback() {
            tracing::warn!(%listen, "the endpoint is reachable from the network: anyone who can reach it can use your exits");
        }
        let mut metrics = ClientMetrics::new();
        metrics.dht = dht;
        let directory = Directory::new(
            &relays,
            pinned,
            tokens,
            transport_params(&limits),
            metrics.descriptors_refused.clone(),
        )
        .context("binding a UDP socket")?;
        Ok(Self {
            listener,
            state: Arc::new(ClientState {
                directory,
                limits,
                policy,
                metrics: Arc::new(metrics),
            }),
        })
    }

    /// The handle that feeds exits found on the DHT into the client's exit set.
    #[must_use]
    pub fn exit_feed(&self) -> ExitFeed {
        ExitFeed {
            state: Arc::clone(&self.state),
        }
    }

    /// The handle the admin listener reads.
    #[must_use]
    pub fn probe(&self) -> ClientProbe {
        ClientProbe {
            state: Arc::clone(&self.state),
        }
    }

    /// The local UDP address the client dials its first relay from (the address the relay
    /// sees, with the host's IP); for tests that check what the relay logs.
    #[must_use]
    pub fn quic_local_addr(&self) -> Option<SocketAddr> {
        self.state
            .directory
            .links()
            .first()
            .and_then(|link| link.local_addr())
    }

    /// The bound HTTP address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Dials the relays and fetches their exit lists once, so a wrong relay identity stops
    /// the client at start with a clear message when it is the only relay. An unreachable
    /// relay is only a warning: requests retry it.
    pub async fn check_relay(&self) -> anyhow::Result<()> {
        let links = self.state.directory.links();
        for link in &links {
            match link.connection().await {
                Err(error @ (ConnectError::WrongPeer { .. } | ConnectError::Tls(_)))
                    if links.len() == 1 =>
                {
                    return Err(error).context("refusing to use this relay");
                }
                Err(error) => {
                    tracing::warn!(relay = %link.relay(), %error, "relay not reachable yet; requests will retry it");
                }
                Ok(_) => {}
            }
        }
        let pinned = !self.state.directory.pinned().is_empty();
        match self.state.directory.refresh().await {
            Ok(0) if pinned => {
                tracing::warn!(
                    "no relay lists a pinned exit yet; requests wait for one (never another exit)"
                );
            }
            Ok(0) => tracing::warn!("the relays have no usable exits registered yet"),
            Ok(exits) => tracing::info!(exits, "exits available"),
            Err(error) => tracing::warn!(%error, "cannot fetch exit lists yet"),
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
        // Give the QUIC connections a moment to say goodbye; never block shutdown on them.
        let links = self.state.directory.links();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            futures_util::future::join_all(links.iter().map(|link| link.close())),
        )
        .await;
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
