//! A client connection to one relay: opened lazily, shared by all requests (one QUIC stream
//! each), reopened when it dies; and the exit list asked over it (by clients, and by
//! discovery when it verifies a relay). The client presents a certificate for a throwaway
//! identity generated for each link, so nothing links its sessions, nor its links to
//! different relays. Which relay a request takes is the directory's choice.

use std::time::Duration;

use libp2p_identity::Keypair;
use tokengo_proto::{
    descriptor::{Descriptor, SignedDescriptor},
    frame::{self, ClientRequest, FrameError, Status},
};
use tokio::sync::Mutex;

use crate::{
    clock::unix_now,
    net::{
        stream::{ReadError, StreamReader},
        transport::{self, ConnectError, RelayAddr, TransportParams},
    },
};

/// Largest exit list accepted from a relay.
pub const MAX_LIST_BYTES: usize = 4 << 20;
/// Most exits accepted from one relay.
pub const MAX_EXITS: usize = 1024;
/// How long a relay may take to answer the exit list request.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a relay could not be used over a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The relay could not be dialled, or did not prove the identity in its address.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection died again while a stream was being opened on a fresh one.
    #[error("connection lost")]
    ConnectionLost,
    /// The request could not be sent.
    #[error("{0}")]
    Send(#[from] quinn::WriteError),
    /// The relay did not answer the exit list request in time.
    #[error("relay did not answer the exit list request")]
    ListTimedOut,
    /// The exit list could not be read (stream reset, over the size bound).
    #[error("exit list: {0}")]
    ListRead(#[from] ReadError<std::convert::Infallible>),
    /// The relay closed the stream without a status byte.
    #[error("empty answer to exit list request")]
    ListEmpty,
    /// The relay answered the exit list request with another status than OK.
    #[error("relay refused the exit list request ({0:#04x})")]
    ListRefused(u8),
    /// The exit list does not decode.
    #[error("malformed exit list: {0}")]
    ListMalformed(#[from] FrameError),
}

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
            tokengo_proto::frame::ALPN_CLIENT,
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
    pub async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream), LinkError> {
        for _ in 0..2 {
            let connection = self.connection().await?;
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
        Err(LinkError::ConnectionLost)
    }

    /// Closes the connection (shutdown).
    pub async fn close(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            connection.close(crate::net::stream::code::ABANDONED, b"client shutting down");
        }
        self.endpoint.wait_idle().await;
    }
}

/// Asks one relay for its exit list and returns the descriptors that verify (the others are
/// logged and dropped).
pub async fn list_exits(link: &RelayLink) -> Result<Vec<Descriptor>, LinkError> {
    let (mut send, recv) = link.open().await?;
    let mut header = Vec::new();
    ClientRequest::ListExits.encode(&mut header);
    send.write_all(&header).await?;
    let _ = send.finish();
    let mut reader = StreamReader::new(recv);
    let answer = tokio::time::timeout(LIST_TIMEOUT, reader.read_to_end(MAX_LIST_BYTES))
        .await
        .map_err(|_| LinkError::ListTimedOut)??;
    let (status, list) = answer.split_first().ok_or(LinkError::ListEmpty)?;
    if Status::try_from(*status).ok() != Some(Status::Ok) {
        return Err(LinkError::ListRefused(*status));
    }
    let descriptors = frame::decode_exit_list(list, MAX_EXITS)?;
    let now = unix_now();
    let exits: Vec<Descriptor> = descriptors
        .iter()
        .filter_map(|bytes| match SignedDescriptor::verify(bytes, now) {
            Ok(d) if !d.key_configs.is_empty() => Some(d),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%error, "relay listed an exit whose descriptor does not verify; ignoring it");
                None
            }
        })
        .collect();
    tracing::debug!(relay = %link.relay(), exits = exits.len(), "exit list fetched");
    Ok(exits)
}
