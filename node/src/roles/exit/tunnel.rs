//! One exit tunnel: the QUIC connection an exit dials to a relay, its registration on the
//! control stream, the request streams the relay opens on it, and the reconnection with
//! backoff when it is lost.

use std::{sync::Arc, time::Duration};

use tokengo_proto::{
    descriptor::{DescriptorError, SignedDescriptor},
    frame::{ControlFrame, FrameError, Status},
};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    BACKOFF_MAX, BACKOFF_MIN, DESCRIPTOR_LIFETIME, DRAIN_DEADLINE, Exit, MAX_TUNNEL_STREAMS,
};
use crate::{
    net::{
        stream::{ReadError, StreamReader, code},
        transport::{self, ConnectError, RelayAddr, TransportParams},
    },
    ops::metrics::{ConnectLabel, ConnectOutcome},
};

impl Exit {
    /// One relay's tunnel, reconnecting with backoff until shutdown or a fatal error; with
    /// `give_up`, also when the tunnel has not been registered for that long (a discovered
    /// relay that is gone: the exit finds another). `retire` ends it gracefully (its relay
    /// address is no longer resolved): no more redials, and a live connection is closed once
    /// the requests in flight on it are done (at most [`DRAIN_DEADLINE`]), since a relay pod
    /// that leaves DNS may still be draining them.
    pub(super) async fn run_one(
        &self,
        relay: &RelayAddr,
        models: &[String],
        registered: watch::Sender<bool>,
        give_up: Option<Duration>,
        stop: &Stop,
    ) -> Result<Ended, TunnelError> {
        let Stop { shutdown, retire } = stop;
        // Its reset key is the identity's: a restarted exit resets what its last run left.
        let endpoint =
            transport::node_endpoint(false, &self.identity).map_err(TunnelError::Bind)?;
        let tasks = TaskTracker::new();
        let mut backoff = BACKOFF_MIN;
        let mut down_since = tokio::time::Instant::now();
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(Ended::Shutdown);
            }
            if retire.is_cancelled() {
                break Ok(Ended::Retired);
            }
            // Subscribed before the descriptor is made: a rotation after this is seen.
            let mut keys = self.key_changes.subscribe();
            let descriptor = self.descriptor(models)?;
            let context = SessionContext {
                endpoint: &endpoint,
                relay,
                models,
                registered: &registered,
                tasks: &tasks,
                shutdown,
                retire,
            };
            match self.session(&context, &descriptor, &mut keys).await {
                Ok(Session::Shutdown) => break Ok(Ended::Shutdown),
                Ok(Session::Retired) => break Ok(Ended::Retired),
                Ok(Session::Lost { was_registered }) => {
                    if was_registered {
                        backoff = BACKOFF_MIN;
                        down_since = tokio::time::Instant::now();
                    }
                    tracing::warn!(%relay, retry_in = ?backoff, "lost the relay; reconnecting");
                }
                Err(error) if error.is_fatal() => {
                    self.connect_failed();
                    break Err(error);
                }
                Err(error) => {
                    self.connect_failed();
                    tracing::warn!(%relay, retry_in = ?backoff, "{error}");
                }
            }
            let _ = registered.send(false);
            if retire.is_cancelled() {
                break Ok(Ended::Retired);
            }
            if give_up.is_some_and(|after| down_since.elapsed() >= after) {
                tracing::warn!(%relay, down_for = ?down_since.elapsed(), "relay lost; looking for another");
                break Ok(Ended::GaveUp);
            }
            tokio::select! {
                () = shutdown.cancelled() => break Ok(Ended::Shutdown),
                () = retire.cancelled() => break Ok(Ended::Retired),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        };
        let _ = registered.send(false);
        tasks.close();
        if tokio::time::timeout(DRAIN_DEADLINE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("requests still running after the drain deadline; closing");
        }
        endpoint.close(code::ABANDONED, b"exit shutting down");
        endpoint.wait_idle().await;
        result
    }

    fn connect_failed(&self) {
        self.metrics
            .relay_connects
            .get_or_create(&ConnectLabel {
                outcome: ConnectOutcome::Failed,
            })
            .inc();
    }

    fn registered(&self, expires_at: u64) {
        self.metrics
            .relay_connects
            .get_or_create(&ConnectLabel {
                outcome: ConnectOutcome::Registered,
            })
            .inc();
        self.metrics.relay_connected.set(1);
        self.metrics
            .descriptor_expiry
            .set(i64::try_from(expires_at).unwrap_or(i64::MAX));
    }

    /// One connection to the relay: register, then serve streams until it ends.
    async fn session(
        &self,
        context: &SessionContext<'_>,
        descriptor: &(SignedDescriptor, u64),
        keys: &mut watch::Receiver<u64>,
    ) -> Result<Session, TunnelError> {
        let SessionContext {
            endpoint,
            relay,
            models,
            registered,
            tasks,
            shutdown,
            retire,
        } = *context;
        // The tunnel's liveness deadline is its idle timeout (QUIC takes the lower end's, so
        // the relay applies it too), with keep-alives at a third of it.
        let params = TransportParams {
            idle_timeout: self.limits.tunnel_liveness,
            max_incoming_streams: MAX_TUNNEL_STREAMS,
            keep_alive: true,
        };
        let connection = transport::connect(
            endpoint,
            &self.identity,
            relay,
            tokengo_proto::frame::ALPN_EXIT,
            params,
        )
        .await?;
        let (mut control_send, control_recv) = connection.open_bi().await?;
        let mut control = StreamReader::new(control_recv);
        register(&mut control_send, &mut control, &descriptor.0).await?;
        tracing::info!(%relay, "registered");
        self.registered(descriptor.1);
        let _ = registered.send(true);
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + DESCRIPTOR_LIFETIME / 2,
            DESCRIPTOR_LIFETIME / 2,
        );
        // A re-registration the relay refused as too frequent, to send again then.
        let mut register_again: Option<tokio::time::Instant> = None;
        // Set once retired: the connection is closed when its requests are done, or then.
        let mut retire_by: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    connection.close(code::ABANDONED, b"exit shutting down");
                    return Ok(Session::Shutdown);
                }
                () = retire.cancelled(), if retire_by.is_none() => {
                    tracing::info!(%relay, in_flight = tasks.len(), "relay address no longer resolved; closing its tunnel once its requests are done");
                    retire_by = Some(tokio::time::Instant::now() + DRAIN_DEADLINE);
                    // Lets `wait` end once no request is in flight.
                    tasks.close();
                }
                () = tasks.wait(), if retire_by.is_some() => {
                    connection.close(code::ABANDONED, b"relay address no longer resolved");
                    return Ok(Session::Retired);
                }
                () = at(retire_by) => {
                    tracing::warn!(%relay, in_flight = tasks.len(), "requests still running on a retired tunnel after the drain deadline; closing");
                    connection.close(code::ABANDONED, b"relay address no longer resolved");
                    return Ok(Session::Retired);
                }
                accepted = connection.accept_bi() => {
                    let Ok((send, recv)) = accepted else {
                        return Ok(Session::Lost { was_registered: true });
                    };
                    tasks.spawn(Arc::clone(&self.gateway).handle(send, recv));
                }
                _ = refresh.tick() => {
                    self.register_fresh(&mut control_send, models).await?;
                }
                // A key rotation: the relay lists the new key at once (the old one is still
                // accepted during its overlap, so requests in flight to it are fine).
                Ok(()) = keys.changed() => {
                    register_again = None;
                    self.register_fresh(&mut control_send, models).await?;
                }
                () = at(register_again) => {
                    register_again = None;
                    self.register_fresh(&mut control_send, models).await?;
                }
                ack = control.decode(MAX_ACK, Duration::MAX, |b| ControlFrame::decode(b, MAX_ACK)) => {
                    match ack {
                        Ok(ControlFrame::Ack { status: Status::Ok, .. }) => {}
                        // The relay keeps the registered descriptor and the tunnel: only the
                        // re-registration came too soon. Requests go on; send it again later.
                        Ok(ControlFrame::Ack { status: Status::Overloaded, reason }) => {
                            tracing::warn!(%relay, %reason, retry_in = ?REREGISTER_AFTER, "relay refused a re-registration");
                            register_again = Some(tokio::time::Instant::now() + REREGISTER_AFTER);
                        }
                        Ok(ControlFrame::Ack { reason, .. }) => {
                            return Err(TunnelError::DescriptorRefused(reason));
                        }
                        Ok(_) | Err(_) => return Ok(Session::Lost { was_registered: true }),
                    }
                }
            }
        }
    }
}

impl Exit {
    /// Sends the current descriptor (re-signed when the keys changed or it is half expired)
    /// on a registered tunnel; the relay's answer arrives on the control stream.
    async fn register_fresh(
        &self,
        control: &mut quinn::SendStream,
        models: &[String],
    ) -> Result<(), TunnelError> {
        let (fresh, expires_at) = self.descriptor(models)?;
        send_register(control, &fresh).await?;
        self.metrics
            .descriptor_expiry
            .set(i64::try_from(expires_at).unwrap_or(i64::MAX));
        Ok(())
    }
}

/// Sleeps until `deadline`; forever when there is none.
async fn at(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How a relay's tunnel task ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// The exit is shutting down.
    Shutdown,
    /// The relay stayed unreachable for the give-up time.
    GaveUp,
    /// The tunnel was retired (its address is no longer resolved).
    Retired,
}

/// What ends a tunnel: the exit's shutdown (at once), or its retirement (gracefully, see
/// [`Exit::run_one`]).
#[derive(Debug, Clone, Default)]
pub(super) struct Stop {
    /// The exit shuts down.
    pub(super) shutdown: CancellationToken,
    /// This tunnel's address is no longer resolved.
    pub(super) retire: CancellationToken,
}

/// How long after a refused (too frequent) re-registration it is sent again: the relay
/// accepts a few at once, then one a minute per tunnel.
const REREGISTER_AFTER: Duration = Duration::from_secs(60);

/// What every session of one exit run shares.
struct SessionContext<'a> {
    endpoint: &'a quinn::Endpoint,
    relay: &'a RelayAddr,
    models: &'a [String],
    registered: &'a watch::Sender<bool>,
    tasks: &'a TaskTracker,
    shutdown: &'a CancellationToken,
    retire: &'a CancellationToken,
}

/// Largest control frame the relay sends (an ACK with a reason).
const MAX_ACK: usize = 4096;

enum Session {
    Shutdown,
    Retired,
    Lost { was_registered: bool },
}

/// Why an exit's tunnel to a relay failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The tunnel's UDP socket could not be bound.
    #[error("binding a UDP socket: {0}")]
    Bind(std::io::Error),
    /// The relay could not be reached, or is not the identity its address names.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection failed before the control stream opened.
    #[error("opening the control stream: {0}")]
    Control(#[from] quinn::ConnectionError),
    /// A registration could not be sent.
    #[error("registration: {0}")]
    Send(#[from] quinn::WriteError),
    /// The relay's acknowledgement did not arrive in time or did not decode.
    #[error("registration: {0}")]
    Ack(#[from] ReadError<FrameError>),
    /// The relay is full or busy: back off and retry, as for a lost connection.
    #[error("relay is busy: {0}")]
    Busy(String),
    /// The relay refused the exit's registration for good.
    #[error("relay refused the exit's registration: {0}")]
    Refused(String),
    /// The relay refused a re-registration for good.
    #[error("relay refused the exit's descriptor: {0}")]
    DescriptorRefused(String),
    /// The relay answered with something other than an acknowledgement.
    #[error("relay sent an unexpected control frame")]
    UnexpectedFrame,
    /// The exit's descriptor could not be signed.
    #[error("signing the exit descriptor: {0}")]
    Sign(#[from] DescriptorError),
}

impl TunnelError {
    /// Whether retrying cannot help, so the exit stops and tells its operator: the relay is
    /// not who its address says, or refused the exit for good, or the exit cannot sign.
    fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Bind(_)
                | Self::Connect(ConnectError::WrongPeer { .. } | ConnectError::Tls(_))
                | Self::Refused(_)
                | Self::DescriptorRefused(_)
                | Self::Sign(_)
        )
    }
}

async fn send_register(
    send: &mut quinn::SendStream,
    descriptor: &SignedDescriptor,
) -> Result<(), TunnelError> {
    let mut frame = Vec::new();
    ControlFrame::Register(descriptor.as_bytes().to_vec()).encode(&mut frame);
    Ok(send.write_all(&frame).await?)
}

async fn register(
    send: &mut quinn::SendStream,
    control: &mut StreamReader,
    descriptor: &SignedDescriptor,
) -> Result<(), TunnelError> {
    send_register(send, descriptor).await?;
    let ack = control
        .decode(MAX_ACK, Duration::from_secs(10), |b| {
            ControlFrame::decode(b, MAX_ACK)
        })
        .await?;
    match ack {
        ControlFrame::Ack {
            status: Status::Ok, ..
        } => Ok(()),
        // A full or busy relay: back off and retry, as for a lost connection.
        ControlFrame::Ack {
            status: Status::Overloaded,
            reason,
        } => Err(TunnelError::Busy(reason)),
        ControlFrame::Ack { reason, .. } => Err(TunnelError::Refused(reason)),
        ControlFrame::Register(_) => Err(TunnelError::UnexpectedFrame),
    }
}
