//! The relay's exit side: an exit's reverse tunnel, whose control stream carries its signed
//! registrations, each checked and acknowledged.

use std::time::Duration;

use bytes::Bytes;
use libp2p_identity::PeerId;
use tokengo_proto::{
    descriptor::{DescriptorError, SignedDescriptor},
    frame::{ControlFrame, Status},
};
use tokio_util::sync::CancellationToken;

use crate::{
    clock::unix_now,
    net::stream::{self, StreamReader, code},
    net::transport,
    ops::metrics::{Registration, RegistrationLabel},
};

use super::{
    HEADER_DEADLINE, MAX_CONTROL_FRAME, REGISTRATION_BURST, Refused, Registered, Registry, Shared,
    token_bucket,
};

/// One exit tunnel: the first stream the exit opens is its control stream, on which it
/// registers signed descriptors.
pub(super) async fn serve(
    connection: quinn::Connection,
    shared: &Shared,
    shutdown: CancellationToken,
) {
    let registry = &shared.registry;
    let Some(peer) = transport::peer_id(&connection) else {
        connection.close(code::PROTOCOL, b"no identity certificate");
        return;
    };
    let control = tokio::select! {
        () = shutdown.cancelled() => return,
        control = tokio::time::timeout(HEADER_DEADLINE, connection.accept_bi()) => control,
    };
    let Ok(Ok((mut send, recv))) = control else {
        connection.close(code::PROTOCOL, b"no control stream");
        return;
    };
    let mut reader = StreamReader::new(recv);
    let mut registered = false;
    let mut rate = token_bucket::TokenBucket::new(REGISTRATION_BURST, 1.0 / 60.0);
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            () = closed(&connection) => break,
            next = reader.decode(MAX_CONTROL_FRAME, Duration::MAX, |buf| ControlFrame::decode(buf, MAX_CONTROL_FRAME)) => next,
        };
        let frame = match next {
            Ok(frame) => frame,
            Err(stream::ReadError::Eof | stream::ReadError::Stream(_)) => break,
            Err(error) => {
                tracing::info!(%peer, %error, "exit sent a malformed control frame; closing its tunnel");
                connection.close(code::PROTOCOL, b"malformed control frame");
                break;
            }
        };
        let ControlFrame::Register(bytes) = frame else {
            connection.close(code::PROTOCOL, b"unexpected control frame");
            break;
        };
        let outcome = if !shared
            .only_exits
            .as_deref()
            .is_none_or(|only| only.contains(&peer))
        {
            Err(Refusal::ForeignExit)
        } else if rate.take(std::time::Instant::now()) {
            register(registry, peer, &connection, bytes)
        } else {
            Err(Refusal::TooFrequent)
        };
        let (status, reason) = match outcome {
            Ok(outcome) => {
                registered = true;
                shared
                    .metrics
                    .registrations
                    .get_or_create(&RegistrationLabel {
                        outcome: (&outcome).into(),
                    })
                    .inc();
                // The exit's own address, with its own id: an exit is not a user.
                tracing::info!(%peer, addr = %connection.remote_address(), ?outcome, exits = registry.len(), "exit registered");
                (Status::Ok, String::new())
            }
            Err(refusal) => {
                shared
                    .metrics
                    .registrations
                    .get_or_create(&RegistrationLabel {
                        outcome: Registration::Refused,
                    })
                    .inc();
                let status = refusal.status();
                // A flood's refusals (overloaded) are not worth a line each.
                if status == Status::Overloaded {
                    tracing::debug!(%peer, reason = %refusal, "exit registration refused");
                } else {
                    tracing::info!(%peer, reason = %refusal, "exit registration refused");
                }
                (status, refusal.to_string())
            }
        };
        let mut ack = Vec::new();
        let refused = status == Status::Overloaded;
        ControlFrame::Ack { status, reason }.encode(&mut ack);
        if send.write_all(&ack).await.is_err() {
            break;
        }
        // A tunnel with no registered exit serves nothing: refused as overloaded (full, or too
        // fast), it is closed, so a registration flood cannot hold connections (and the
        // relay's memory) open. The exit reads the acknowledgement first, then reconnects
        // after its backoff.
        if refused && !registered {
            let _ = send.finish();
            let _ = tokio::time::timeout(HEADER_DEADLINE, send.stopped()).await;
            connection.close(code::ABANDONED, b"registration refused");
            break;
        }
    }
    if registered && registry.remove(&peer, &connection) {
        tracing::info!(%peer, exits = registry.len(), "exit disconnected");
    }
}

/// Why an exit's registration was refused; its words go back in the acknowledgement.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// This relay serves only its own exit (`tokengo serve`'s internal relay).
    #[error("this relay accepts only its own exit")]
    ForeignExit,
    /// Registrations arrive on this tunnel faster than one a minute after a short burst.
    #[error("registrations too frequent on this tunnel; retry later")]
    TooFrequent,
    /// The descriptor does not verify (signature, encoding, expiry).
    #[error("{0}")]
    Descriptor(#[from] DescriptorError),
    /// The descriptor names another identity than the one the connection proved.
    #[error("descriptor is for {claimed} but the connection proved {proved}")]
    OtherIdentity {
        /// The descriptor's PeerId (boxed: the error stays small on the happy path).
        claimed: Box<PeerId>,
        /// The connection's.
        proved: Box<PeerId>,
    },
    /// The registry is full or admits new identities no faster.
    #[error(transparent)]
    Registry(#[from] Refused),
}

impl Refusal {
    /// The acknowledgement's status: `Overloaded` when trying again later (or elsewhere) may
    /// work, `Malformed` when it never will, so a foreign or broken exit stops retrying.
    fn status(&self) -> Status {
        match self {
            Self::ForeignExit | Self::Descriptor(_) | Self::OtherIdentity { .. } => {
                Status::Malformed
            }
            Self::TooFrequent => Status::Overloaded,
            Self::Registry(refused) => refused.status(),
        }
    }
}

fn register(
    registry: &Registry,
    peer: PeerId,
    connection: &quinn::Connection,
    bytes: Vec<u8>,
) -> Result<Registered, Refusal> {
    let descriptor = SignedDescriptor::verify(&bytes, unix_now())?;
    // The descriptor must belong to the identity this connection proved: otherwise an exit
    // could register (and hijack routing for) another exit's id.
    if descriptor.peer_id != peer {
        return Err(Refusal::OtherIdentity {
            claimed: Box::new(descriptor.peer_id),
            proved: Box::new(peer),
        });
    }
    Ok(registry.register(
        peer,
        connection,
        Bytes::from(bytes),
        descriptor.expires_at,
        descriptor.max_streams,
    )?)
}

async fn closed(connection: &quinn::Connection) {
    connection.closed().await;
}
