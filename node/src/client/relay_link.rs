//! The client's connection to its relay: opened lazily, shared by all requests (one QUIC
//! stream each), reopened when it dies. The client presents a certificate for a throwaway
//! identity generated at start, so nothing links its sessions. With several relays (found by
//! discovery, best first) a relay that cannot be reached is skipped for the next one.

use libp2p_identity::Keypair;
use tokio::sync::Mutex;

use crate::{
    api_error::ApiError,
    transport::{self, ConnectError, RelayAddr, TransportParams},
};

/// A shared, self-healing connection to one relay.
#[derive(Debug)]
pub struct RelayLink {
    endpoint: quinn::Endpoint,
    identity: Keypair,
    /// Best first; `current` is the one in use.
    relays: Vec<RelayAddr>,
    current: std::sync::atomic::AtomicUsize,
    params: TransportParams,
    connection: Mutex<Option<quinn::Connection>>,
    /// The last connection made, readable without waiting for a dial in progress (status).
    last: std::sync::Mutex<Option<quinn::Connection>>,
}

impl RelayLink {
    /// A link to `relay`; nothing is dialled yet.
    pub fn new(relay: RelayAddr, params: TransportParams) -> std::io::Result<Self> {
        Self::with_failover(vec![relay], params)
    }

    /// A link to the first of `relays` that answers (tried in order); nothing is dialled yet.
    /// `relays` must not be empty.
    pub fn with_failover(relays: Vec<RelayAddr>, params: TransportParams) -> std::io::Result<Self> {
        if relays.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no relay to connect to",
            ));
        }
        Ok(Self {
            endpoint: transport::client_endpoint(false)?,
            identity: Keypair::generate_ed25519(),
            relays,
            current: std::sync::atomic::AtomicUsize::new(0),
            params,
            connection: Mutex::new(None),
            last: std::sync::Mutex::new(None),
        })
    }

    /// Whether the last connection to the relay is still up.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|c| c.close_reason().is_none())
    }

    /// The local UDP address.
    #[must_use]
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The address of the relay in use (or tried next).
    #[must_use]
    pub fn relay(&self) -> &RelayAddr {
        let index = self.current.load(std::sync::atomic::Ordering::Relaxed);
        // `relays` is never empty and `current` is always an index into it.
        &self.relays[index % self.relays.len()]
    }

    /// All relays of this link, best first.
    #[must_use]
    pub fn relays(&self) -> &[RelayAddr] {
        &self.relays
    }

    /// The live connection, dialling if there is none.
    pub async fn connection(&self) -> Result<quinn::Connection, ConnectError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(connection.clone());
        }
        let start = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let mut last_error = None;
        let mut connected = None;
        for offset in 0..self.relays.len() {
            let index = (start + offset) % self.relays.len();
            let relay = &self.relays[index];
            match transport::connect(
                &self.endpoint,
                &self.identity,
                relay,
                transport::ALPN_CLIENT,
                self.params,
            )
            .await
            {
                Ok(connection) => {
                    if index != start {
                        tracing::warn!(%relay, "failed over to another relay");
                    }
                    self.current
                        .store(index, std::sync::atomic::Ordering::Relaxed);
                    connected = Some(connection);
                    break;
                }
                Err(error) => {
                    if self.relays.len() > 1 {
                        tracing::warn!(%relay, %error, "relay unreachable; trying the next one");
                    }
                    last_error = Some(error);
                }
            }
        }
        let connection = match (connected, last_error) {
            (Some(connection), _) => connection,
            (None, Some(error)) => return Err(error),
            (None, None) => return Err(ConnectError::Resolve("no relay configured".into())),
        };
        *slot = Some(connection.clone());
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(connection.clone());
        Ok(connection)
    }

    /// Opens a request stream, redialling once if the cached connection turned out dead.
    pub async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream), ApiError> {
        for _ in 0..2 {
            let connection = self
                .connection()
                .await
                .map_err(|e| ApiError::RelayUnreachable(e.to_string()))?;
            match connection.open_bi().await {
                Ok(streams) => return Ok(streams),
                Err(_) => {
                    let mut slot = self.connection.lock().await;
                    if slot
                        .as_ref()
                        .is_some_and(|c| c.stable_id() == connection.stable_id())
                    {
                        *slot = None;
                    }
                }
            }
        }
        Err(ApiError::RelayUnreachable("connection lost".into()))
    }

    /// Closes the connection (shutdown).
    pub async fn close(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            connection.close(crate::stream::code::ABANDONED, b"client shutting down");
        }
        self.endpoint.wait_idle().await;
    }
}
