//! The client's connection to one relay: opened lazily, shared by all requests (one QUIC
//! stream each), reopened when it dies. The client presents a certificate for a throwaway
//! identity generated for each link, so nothing links its sessions, nor its links to
//! different relays. Which relay a request takes is the directory's choice.

use libp2p_identity::Keypair;
use tokio::sync::Mutex;

use crate::{
    net::transport::{self, ConnectError, RelayAddr, TransportParams},
    web::api_error::ApiError,
};

/// A shared, self-healing connection to one relay.
#[derive(Debug)]
pub struct RelayLink {
    endpoint: quinn::Endpoint,
    identity: Keypair,
    relay: RelayAddr,
    params: TransportParams,
    connection: Mutex<Option<quinn::Connection>>,
    /// The last connection made, readable without waiting for a dial in progress (status).
    last: std::sync::Mutex<Option<quinn::Connection>>,
}

impl RelayLink {
    /// A link to `relay`; nothing is dialled yet.
    pub fn new(relay: RelayAddr, params: TransportParams) -> std::io::Result<Self> {
        Ok(Self {
            endpoint: transport::client_endpoint(false)?,
            identity: Keypair::generate_ed25519(),
            relay,
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

    /// The relay's address.
    #[must_use]
    pub fn relay(&self) -> &RelayAddr {
        &self.relay
    }

    /// The live connection, dialling if there is none.
    pub async fn connection(&self) -> Result<quinn::Connection, ConnectError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(connection.clone());
        }
        let connection = transport::connect(
            &self.endpoint,
            &self.identity,
            &self.relay,
            transport::ALPN_CLIENT,
            self.params,
        )
        .await?;
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
            connection.close(crate::net::stream::code::ABANDONED, b"client shutting down");
        }
        self.endpoint.wait_idle().await;
    }
}
