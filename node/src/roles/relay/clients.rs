//! The relay's client side: each bidirectional stream of a client connection is one request,
//! copied to the exit it names through one of that exit's stream slots, and its answer back.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use libp2p_identity::PeerId;
use tokengo_proto::frame::{self, ClientRequest, ExitRequest, Status};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, field::Empty};

use crate::{
    clock::unix_now,
    net::stream::{self, PipeLimits, ReadBound, StreamReader, code},
    ops::metrics::{ErrorClass, Flow, FlowLabel, InFlight, KindLabel, RelayMetrics, RelayRequest},
};

use super::{Direction, HEADER_DEADLINE, SLOT_WAIT, Shared, admission, slots, source};

/// One client connection: each bidirectional stream is one request. No address is logged,
/// and the per-stream spans carry no exit id, so neither logs nor traces can pair the two.
pub(super) async fn serve(
    connection: quinn::Connection,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let client = Arc::new(Client {
        holder: slots::Holder {
            connection: connection.stable_id(),
            source: source::Source::of(connection.remote_address()),
        },
        refusals: admission::RefusalBudget::default(),
        connection: connection.clone(),
    });
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = connection.accept_bi() => accepted,
        };
        let Ok((send, recv)) = accepted else { break };
        let shared = Arc::clone(&shared);
        let client = Arc::clone(&client);
        tasks.spawn(async move {
            if let Err(error) = client_stream(send, recv, &shared, &client).await {
                tracing::debug!(%error, "client stream ended with an error");
            }
        });
    }
}

/// A client connection as its streams see it.
struct Client {
    /// Whose slots its requests take.
    holder: slots::Holder,
    /// Malformed requests the relay answers on it before closing it.
    refusals: admission::RefusalBudget,
    connection: quinn::Connection,
}

impl Client {
    /// Counts a malformed request header: a client sends none, so a connection past its
    /// budget is closed (garbage then costs the sender a new handshake each, which its
    /// address's connection rate bounds). Unknown exits are not counted: an honest client
    /// may have many requests in flight to an exit that just left.
    fn refused(&self, metrics: &RelayMetrics) {
        if !self.refusals.spend(std::time::Instant::now()) {
            metrics.refusal_closes.inc();
            self.connection
                .close(code::PROTOCOL, b"too many refused requests");
        }
    }
}

async fn client_stream(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    shared: &Shared,
    client: &Client,
) -> anyhow::Result<()> {
    let metrics = &shared.metrics;
    let mut reader = StreamReader::new(recv);
    let (request, version) = match reader
        .decode(
            frame::MAX_EXIT_ID_LEN + 16,
            HEADER_DEADLINE,
            ClientRequest::decode_versioned,
        )
        .await
    {
        Ok(request) => request,
        Err(error) => {
            metrics.error(ErrorClass::Malformed);
            reader.stop(code::PROTOCOL);
            reply_status(&mut send, Status::Malformed).await;
            client.refused(metrics);
            return Err(anyhow::anyhow!("bad request header: {error}"));
        }
    };
    match request {
        ClientRequest::ListExits => {
            metrics
                .requests
                .get_or_create(&KindLabel {
                    kind: RelayRequest::ListExits,
                })
                .inc();
            let answer = shared.registry.exit_list(unix_now());
            stream::write_bounded(&mut send, answer, shared.limits.write_stall_timeout).await?;
            send.finish()?;
            Ok(())
        }
        ClientRequest::Forward { exit_id, media } => {
            metrics
                .requests
                .get_or_create(&KindLabel {
                    kind: RelayRequest::Forward,
                })
                .inc();
            // A root span of its own: the relay continues no one's trace. It names neither the
            // client nor the exit.
            let span = tracing::info_span!(
                parent: None,
                "relay.forward",
                otel.kind = "server",
                tokengo.media = crate::ops::metrics::Media::from(media).as_str(),
                tokengo.outcome = Empty,
                otel.status_code = Empty,
            );
            let outcome = async {
                let Ok(peer) = PeerId::from_bytes(&exit_id) else {
                    reply_status(&mut send, Status::NoSuchExit).await;
                    return Err(ErrorClass::NoSuchExit);
                };
                let Some(route) = shared.registry.route(&peer, unix_now()) else {
                    reply_status(&mut send, Status::NoSuchExit).await;
                    return Err(ErrorClass::NoSuchExit);
                };
                let Some(_slot) = slot(&route.slots, client.holder, metrics).await else {
                    reply_status(&mut send, Status::Overloaded).await;
                    return Err(ErrorClass::Overloaded);
                };
                let exit = Tunnel {
                    connection: &route.connection,
                    version,
                };
                forward(reader, send, exit, media, shared).await
            }
            .instrument(span.clone())
            .await;
            match outcome {
                Ok(()) => {
                    span.record("tokengo.outcome", "ok");
                    Ok(())
                }
                Err(class) => {
                    metrics.error(class);
                    span.record("tokengo.outcome", class.as_str());
                    span.record("otel.status_code", "error");
                    Ok(())
                }
            }
        }
    }
}

/// One of the exit's stream slots for a request of `client`, waiting at most [`SLOT_WAIT`];
/// `None` means the answer is `Overloaded`.
async fn slot(
    slots: &Arc<slots::Slots>,
    client: slots::Holder,
    metrics: &RelayMetrics,
) -> Option<slots::Slot> {
    match slots.acquire(client, std::time::Instant::now()) {
        slots::Admission::Granted(slot) => Some(slot),
        slots::Admission::Refused => None,
        slots::Admission::Wait(grant) => {
            metrics.source_waits.inc();
            tokio::time::timeout(SLOT_WAIT, grant).await.ok()?.ok()
        }
    }
}

/// The exit a request goes to, and the stream protocol version the client spoke (which the
/// exit answers in).
struct Tunnel<'a> {
    connection: &'a quinn::Connection,
    version: u8,
}

/// Opens a stream on the exit's tunnel and splices the two streams together.
async fn forward(
    reader: StreamReader,
    mut client_send: quinn::SendStream,
    tunnel: Tunnel<'_>,
    media: frame::MediaType,
    shared: &Shared,
) -> Result<(), ErrorClass> {
    let exit = tunnel.connection;
    let tap = shared.tap.as_deref();
    let metrics = &shared.metrics;
    let started = std::time::Instant::now();
    let in_flight = InFlight::start(&metrics.streams_in_flight);
    let counter = |direction| {
        metrics
            .forwarded_bytes
            .get_or_create_owned(&FlowLabel { direction })
    };
    let (to_exit, to_client) = (counter(Flow::ToExit), counter(Flow::ToClient));
    let observe = |direction, bytes: &[u8]| {
        if let Some(tap) = tap {
            tap.forwarded(direction, bytes);
        }
        let counter = match direction {
            Direction::ToExit => &to_exit,
            Direction::ToClient => &to_client,
        };
        counter.inc_by(bytes.len() as u64);
    };
    // A tunnel whose exit grants no stream credit (overloaded, wedged, or hostile) must not
    // hold the client's stream: opening is bounded.
    let opened = tokio::time::timeout(shared.limits.stream_open_timeout, exit.open_bi()).await;
    let Ok(Ok((mut exit_send, mut exit_recv))) = opened else {
        reply_status(&mut client_send, Status::ExitUnavailable).await;
        return Err(ErrorClass::ExitUnavailable);
    };
    let (mut client_recv, already_read, client_done) = reader.into_parts();
    let mut head = Vec::with_capacity(2 + already_read.len());
    ExitRequest { media }.encode_version(tunnel.version, &mut head);
    head.extend_from_slice(&already_read);
    observe(Direction::ToExit, &head);
    let stall = shared.limits.write_stall_timeout;
    if stream::write_bounded(&mut exit_send, Bytes::from(head), stall)
        .await
        .is_err()
    {
        reply_status(&mut client_send, Status::ExitUnavailable).await;
        return Err(ErrorClass::ExitUnavailable);
    }
    // Set once the request has gone to the exit whole (or its upload ended otherwise): from
    // then on the exit's first answer byte is due within `exit_answer_timeout`.
    let (whole_tx, whole_rx) = watch::channel(false);
    let upstream = async {
        let sent = if client_done {
            let _ = exit_send.finish();
            Ok(0)
        } else {
            // The request body: bounded in rate, so trickling cannot hold the exit's slot.
            let limits = PipeLimits {
                write_stall: stall,
                read: ReadBound::MinRate {
                    grace: shared.limits.request_body_grace,
                    bytes_per_sec: shared.limits.min_request_body_rate,
                },
            };
            stream::pipe(&mut client_recv, &mut exit_send, limits, |bytes| {
                observe(Direction::ToExit, bytes);
            })
            .await
        };
        whole_tx.send_replace(true);
        sent
    };
    let mut first = true;
    // The response: the backend may pause for minutes (its idle timeout is the exit's), but a
    // client that stops reading is cut after the stall timeout.
    let limits = PipeLimits {
        write_stall: stall,
        read: ReadBound::None,
    };
    let downstream = async {
        // Version 2: the exit answers (`ACCEPTED` at the latest) before it calls its backend,
        // so until its first byte the request cannot have reached a backend. An exit that
        // went away or stayed silent before it is told to stop, and the client is told the
        // exit is unavailable: it may send the request to another exit.
        if tunnel.version >= frame::VERSION_ACCEPTED {
            let timeout = shared.limits.exit_answer_timeout;
            let Some(bytes) = first_answer(&mut exit_recv, whole_rx, timeout).await else {
                let _ = exit_recv.stop(code::ABANDONED);
                reply_status(&mut client_send, Status::ExitUnavailable).await;
                return Err(Downstream::NotAnswered);
            };
            first = false;
            metrics.exit_first_byte.observe(started.elapsed());
            observe(Direction::ToClient, &bytes);
            if stream::write_bounded(&mut client_send, bytes, stall)
                .await
                .is_err()
            {
                let _ = exit_recv.stop(code::PEER_GONE);
                return Err(Downstream::Pipe(stream::PipeError::WriteSide));
            }
        }
        stream::pipe(&mut exit_recv, &mut client_send, limits, |bytes| {
            if std::mem::take(&mut first) {
                metrics.exit_first_byte.observe(started.elapsed());
            }
            observe(Direction::ToClient, bytes);
        })
        .await
        .map_err(Downstream::Pipe)
    };
    let (up, down) = tokio::join!(upstream, downstream);
    drop(in_flight);
    if up.is_ok() && down.is_ok() {
        // The task lasts until the client has acknowledged the whole answer: a draining relay
        // closes its endpoint once these tasks end, and closing drops data not yet
        // acknowledged, which cut answers after `ACCEPTED` (502s in the rolling-restart fault
        // scenario).
        let _ = tokio::time::timeout(stall, client_send.stopped()).await;
    }
    match (up, down) {
        (Ok(_), Ok(_)) => Ok(()),
        (_, Err(Downstream::NotAnswered)) => Err(ErrorClass::ExitUnavailable),
        (up, down) => {
            let down = match down {
                Err(Downstream::Pipe(error)) => Some(error),
                _ => None,
            };
            if let Some(error) = up.err().or(down) {
                tracing::debug!(%error, "forwarded stream failed");
            }
            Err(ErrorClass::StreamFailed)
        }
    }
}

/// How the exit's side of a forwarded stream ended badly.
enum Downstream {
    /// The exit went away, ended the stream or stayed silent before its first answer byte.
    NotAnswered,
    /// The copy failed after it.
    Pipe(stream::PipeError),
}

/// The exit's first answer bytes; `None` when its stream failed or ended first, or when it
/// stayed silent for `timeout` after the request reached it whole (`whole` turns true; a
/// sender dropped without that starts the deadline too).
async fn first_answer(
    exit_recv: &mut quinn::RecvStream,
    mut whole: watch::Receiver<bool>,
    timeout: Duration,
) -> Option<Bytes> {
    let deadline = async move {
        let _ = whole.wait_for(|whole| *whole).await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        read = exit_recv.read_chunk(usize::MAX, true) => read.ok()?.map(|chunk| chunk.bytes),
        () = deadline => None,
    }
}

async fn reply_status(send: &mut quinn::SendStream, status: Status) {
    if send.write_all(&[status as u8]).await.is_ok() {
        let _ = send.finish();
    }
}
