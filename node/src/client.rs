//! The client: a local OpenAI-compatible HTTP endpoint that encrypts every request to an exit
//! and sends it through the relay.

mod body;
mod directory;
mod proxy;
mod relay_link;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

pub use directory::{Directory, ExitInfo};
pub use relay_link::RelayLink;

use crate::{
    api_error::ApiError,
    config::{ClientConfig, Limits},
    transport::{ConnectError, RelayAddr, TransportParams},
};

/// Shared by all request handlers.
#[derive(Debug)]
pub struct ClientState {
    link: RelayLink,
    directory: Directory,
    limits: Limits,
}

/// Runs `tokengo client` until shutdown.
pub async fn run(config: ClientConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = Client::bind(config.listen, config.relay, config.limits).await?;
    client.check_relay().await?;
    println!("client listening on http://{}", client.local_addr());
    client.run(shutdown).await
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
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| {
            format!("cannot listen on {listen} (is something else using it? choose another with --listen)")
        })?;
        if !listen.ip().is_loopback() {
            tracing::warn!(%listen, "the endpoint is reachable from the network: anyone who can reach it can use your exits");
        }
        let params = TransportParams {
            idle_timeout: limits.quic_idle_timeout,
            max_incoming_streams: 0,
            keep_alive: true,
        };
        let link = RelayLink::new(relay, params).context("binding a UDP socket")?;
        Ok(Self {
            listener,
            state: Arc::new(ClientState {
                link,
                directory: Directory::default(),
                limits,
            }),
        })
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
            Err(error @ (ConnectError::WrongPeer { .. } | ConnectError::Tls(_))) => {
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
        axum::serve(self.listener, router)
            .with_graceful_shutdown(async move { drain.cancelled().await })
            .await
            .context("HTTP server failed")?;
        // Give the QUIC connection a moment to say goodbye; never block shutdown on it.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.state.link.close()).await;
        Ok(())
    }
}

/// Maps a failure before any exit was reached to the user's HTTP error.
#[must_use]
pub fn error_response(error: &ApiError) -> axum::response::Response {
    proxy::error_response(error)
}
