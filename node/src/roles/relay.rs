//! The relay: accepts exits on their reverse tunnels and clients on theirs, and copies each
//! client stream to the exit it names. It never decrypts, never parses bodies, and never logs a
//! client's address together with an exit.

mod admission;
pub mod config;
mod registry;
mod slots;
mod source;
mod token_bucket;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use libp2p_identity::{Keypair, PeerId};
use tokengo_proto::{
    descriptor::SignedDescriptor,
    frame::{self, ClientRequest, ControlFrame, ExitRequest, Status},
};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, field::Empty};

use self::config::RelayConfig;
pub use registry::{MAX_INFO_BYTES, MAX_LIST_BYTES, Refused, Registered, Registry};

use crate::{
    clock::unix_now,
    config::{
        Limits,
        defaults::{
            DRAIN_DEADLINE, HEADER_DEADLINE, MAX_CLIENT_STREAMS, MAX_CONTROL_FRAME, SLOT_WAIT,
            TUNNEL_REGISTRATION_BURST as REGISTRATION_BURST, TUNNEL_REGISTRATIONS_PER_SEC,
        },
    },
    net::stream::{self, PipeLimits, ReadBound, StreamReader, code},
    net::transport::{self, RelayAddr, TransportParams},
    ops::metrics::{ErrorClass, Flow, FlowLabel, InFlight, KindLabel, RelayMetrics, RelayRequest},
    store::identity,
};

/// Loads (or creates) the relay's identity and binds its QUIC endpoint.
pub fn start(config: &RelayConfig) -> anyhow::Result<(Relay, Keypair)> {
    config.data_dir.ensure()?;
    let (identity, created) =
        identity::load_or_create(&config.data_dir.file("relay_identity.key"))?;
    if created {
        tracing::info!(peer_id = %identity::peer_id(&identity), "created relay identity");
    }
    let relay = Relay::bind(config.listen, &identity, &config.limits)?;
    if config.listen.ip().is_unspecified() {
        tracing::info!(
            "listening on all interfaces; give clients and exits this address with your public IP in place of 127.0.0.1"
        );
    }
    Ok((relay, identity))
}

/// Runs a started relay until shutdown, with its DHT announcement when configured.
pub async fn serve(
    config: RelayConfig,
    relay: Relay,
    identity: Keypair,
    shutdown: CancellationToken,
) {
    println!("relay listening on {}", relay.addr());
    let dht = config.dht.as_ref().map(|dht| {
        tokio::spawn(announce(
            dht.clone(),
            &relay,
            identity.clone(),
            shutdown.clone(),
        ))
    });
    relay.run(shutdown.clone()).await;
    if let Some(task) = dht {
        shutdown.cancel();
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "DHT announcement stopped"),
            Err(error) => tracing::warn!(%error, "DHT announcement task failed"),
        }
    }
}

/// Announces `relay` on the DHT with its own identity (one PeerId for the QUIC certificate
/// and the DHT). The QUIC addresses it advertises are its external IPs with the QUIC port, or
/// its loopback address under the `loopback` policy.
fn announce(
    dht: config::RelayDhtConfig,
    relay: &Relay,
    identity: Keypair,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = Result<(), crate::net::discovery::DiscoveryError>> + use<> {
    let port = relay.addr().to_multiaddr().iter().find_map(|p| match p {
        multiaddr::Protocol::Udp(port) => Some(port),
        _ => None,
    });
    let peer = relay.addr().peer_id();
    let mut quic: Vec<RelayAddr> = dht
        .external_ips
        .iter()
        .filter_map(|ip| Some(RelayAddr::new(SocketAddr::new(*ip, port?), peer)))
        .collect();
    if quic.is_empty() && dht.config.policy == crate::net::discovery::AddressPolicy::Loopback {
        quic.push(relay.addr().clone());
    }
    let metrics = relay.metrics();
    let announcer = crate::net::discovery::Announcer {
        identity,
        listen: dht.listen,
        external_ips: dht.external_ips.clone(),
        info: crate::net::discovery::Answer::Relay(relay_info_source(quic, relay.registry())),
        status: relay.dht_status(),
        metrics: metrics.dht.clone(),
        guard: crate::net::discovery::DialGuard {
            refused: metrics.dht.dials_refused.clone(),
            observer: None,
        },
    };
    async move { crate::net::discovery::announce(&dht.config, announcer, shutdown).await }
}

/// What a real relay answers on relay-info: its QUIC addresses, both ALPNs, and the signed
/// descriptors of the exits registered with it now.
#[must_use]
pub fn relay_info_source(
    quic_addrs: Vec<RelayAddr>,
    registry: Arc<Registry>,
) -> crate::net::discovery::InfoSource {
    let quic_addrs: Vec<Vec<u8>> = quic_addrs
        .iter()
        .map(|a| a.to_multiaddr().to_vec())
        .collect();
    Arc::new(move || {
        Some(tokengo_proto::relay_info::RelayInfo {
            quic_addrs: quic_addrs.clone(),
            alpns: vec![
                transport::ALPN_CLIENT.to_vec(),
                transport::ALPN_EXIT.to_vec(),
            ],
            exits: registry.info_descriptors(unix_now()).to_vec(),
        })
    })
}

/// Which way forwarded bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a client towards an exit.
    ToExit,
    /// From an exit back to a client.
    ToClient,
}

/// Sees every byte the relay forwards on request streams, exactly as forwarded. For audits
/// and for the tests that prove a relay only ever holds ciphertext.
pub trait Tap: Send + Sync + std::fmt::Debug {
    /// Called for each piece of forwarded data.
    fn forwarded(&self, direction: Direction, bytes: &[u8]);
}

/// A bound relay.
#[derive(Debug)]
pub struct Relay {
    endpoint: quinn::Endpoint,
    addr: RelayAddr,
    registry: Arc<Registry>,
    /// When set, the only exit identities allowed to register (`serve`'s own exit).
    only_exits: Option<Arc<[PeerId]>>,
    tap: Option<Arc<dyn Tap>>,
    metrics: Arc<RelayMetrics>,
    limits: Limits,
    accepting: watch::Sender<bool>,
    /// The DHT announcement's state; `None` while the relay does not announce.
    dht: Arc<watch::Sender<Option<crate::ops::status::DhtStatus>>>,
}

/// What every connection task of one relay shares.
#[derive(Debug)]
struct Shared {
    registry: Arc<Registry>,
    only_exits: Option<Arc<[PeerId]>>,
    tap: Option<Arc<dyn Tap>>,
    metrics: Arc<RelayMetrics>,
    limits: Limits,
}

/// What the admin listener reads from a running relay: readiness, status and metrics.
#[derive(Debug, Clone)]
pub struct RelayProbe {
    addr: RelayAddr,
    registry: Arc<Registry>,
    metrics: Arc<RelayMetrics>,
    /// True while the accept loop runs.
    accepting: watch::Receiver<bool>,
    dht: watch::Receiver<Option<crate::ops::status::DhtStatus>>,
}

impl RelayProbe {
    /// The relay's metrics.
    #[must_use]
    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    /// Why the relay is not ready: it is ready while it accepts connections.
    #[must_use]
    pub fn not_ready(&self) -> Vec<String> {
        if *self.accepting.borrow() {
            Vec::new()
        } else {
            vec!["relay: not accepting connections".to_owned()]
        }
    }

    /// The relay's part of `/status`.
    #[must_use]
    pub fn status(&self, requests_per_sec: Option<f64>) -> crate::ops::status::RelayStatus {
        crate::ops::status::RelayStatus {
            peer_id: self.addr.peer_id().to_string(),
            address: self.addr.to_string(),
            accepting: *self.accepting.borrow(),
            exits_registered: self.registry.len() as u64,
            client_connections: self.metrics.client_connections.get(),
            streams_in_flight: self.metrics.streams_in_flight.get(),
            requests_total: self.metrics.forwards_total(),
            requests_per_sec,
            errors_total: self.metrics.errors_total(),
            exit_first_byte: (&self.metrics.exit_first_byte.snapshot()).into(),
            dht: self.dht.borrow().clone(),
        }
    }
}

impl Relay {
    /// Binds the QUIC endpoint with the identity-bound certificate.
    pub fn bind(listen: SocketAddr, identity: &Keypair, limits: &Limits) -> anyhow::Result<Self> {
        let params = TransportParams {
            idle_timeout: limits.quic_idle_timeout,
            max_incoming_streams: MAX_CLIENT_STREAMS,
            keep_alive: false,
        };
        let endpoint = transport::server_endpoint(listen, identity, params)?;
        let local = endpoint.local_addr()?;
        let addr = RelayAddr::new(transport::dialable(local), identity::peer_id(identity));
        let registry = Arc::new(Registry::new(limits));
        let mut metrics = RelayMetrics::new();
        metrics.exits_registered = registry.gauge();
        Ok(Self {
            endpoint,
            addr,
            registry,
            only_exits: None,
            tap: None,
            metrics: Arc::new(metrics),
            limits: limits.clone(),
            accepting: watch::Sender::new(false),
            dht: Arc::new(watch::Sender::new(None)),
        })
    }

    /// The handle the admin listener reads.
    #[must_use]
    pub fn probe(&self) -> RelayProbe {
        RelayProbe {
            addr: self.addr.clone(),
            registry: Arc::clone(&self.registry),
            metrics: Arc::clone(&self.metrics),
            accepting: self.accepting.subscribe(),
            dht: self.dht.subscribe(),
        }
    }

    /// Where the DHT announcement reports its state (shown in `/status`).
    #[must_use]
    pub fn dht_status(&self) -> Arc<watch::Sender<Option<crate::ops::status::DhtStatus>>> {
        Arc::clone(&self.dht)
    }

    /// The relay's metrics.
    #[must_use]
    pub fn metrics(&self) -> Arc<RelayMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Accepts registrations from these exit identities only; any other exit is refused
    /// (`serve`: its internal relay is for its own exit, not for any local process).
    #[must_use]
    pub fn only_exits(mut self, exits: Vec<PeerId>) -> Self {
        self.only_exits = Some(exits.into());
        self
    }

    /// Installs a tap that sees all forwarded bytes.
    #[must_use]
    pub fn with_tap(mut self, tap: Arc<dyn Tap>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// The multiaddr clients and exits dial.
    #[must_use]
    pub fn addr(&self) -> &RelayAddr {
        &self.addr
    }

    /// The exit table (for tests and status).
    #[must_use]
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// Accepts connections until `shutdown`, then drains in-flight streams.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let shared = Arc::new(Shared {
            registry: Arc::clone(&self.registry),
            only_exits: self.only_exits.clone(),
            tap: self.tap.clone(),
            metrics: Arc::clone(&self.metrics),
            limits: self.limits.clone(),
        });
        self.accepting.send_replace(true);
        self.metrics.accepting.set(1);
        let handshaking = Arc::new(AtomicUsize::new(0));
        let gate = admission::ConnectionGate::new(
            self.limits.source_connection_burst,
            self.limits.source_connections_per_sec,
        );
        loop {
            let incoming = tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => incoming,
            };
            let Some(incoming) = incoming else { break };
            let Some(incoming) = self.screen(incoming, &gate, &handshaking) else {
                continue;
            };
            let shared = Arc::clone(&shared);
            let shutdown = shutdown.clone();
            let tracker = tasks.clone();
            let handshake = Handshake::start(&handshaking);
            tasks.spawn(async move {
                let connecting = incoming.await;
                drop(handshake);
                match connecting {
                    Ok(connection) => serve_connection(connection, shared, tracker, shutdown).await,
                    // Handshake failures are the peer's problem; the relay keeps serving.
                    Err(error) => tracing::debug!(%error, "handshake failed"),
                }
            });
        }
        self.accepting.send_replace(false);
        self.metrics.accepting.set(0);
        tasks.close();
        if tokio::time::timeout(DRAIN_DEADLINE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("streams still open after the drain deadline; closing");
        }
        self.endpoint.close(code::ABANDONED, b"relay shutting down");
        self.endpoint.wait_idle().await;
    }
}

impl Relay {
    /// What happens to a connection attempt before its handshake: it goes on, or it is asked
    /// to prove its address (QUIC Retry), refused or dropped, each costing the relay one
    /// stateless packet at most.
    fn screen(
        &self,
        incoming: quinn::Incoming,
        gate: &admission::ConnectionGate,
        handshaking: &AtomicUsize,
    ) -> Option<quinn::Incoming> {
        let proven = incoming.remote_address_validated();
        let can_retry = !proven && incoming.may_retry();
        let source = source::Source::of(incoming.remote_address());
        match gate.admit(source, proven, can_retry, std::time::Instant::now()) {
            admission::Verdict::Accept => {}
            admission::Verdict::Retry => {
                self.metrics.handshake_retries.inc();
                let _ = incoming.retry();
                return None;
            }
            admission::Verdict::Refuse => {
                self.metrics.source_connections_refused.inc();
                incoming.refuse();
                return None;
            }
            admission::Verdict::Ignore => {
                self.metrics.source_connections_refused.inc();
                incoming.ignore();
                return None;
            }
        }
        // Under a handshake flood, make new peers prove their address first (QUIC Retry):
        // spoofed sources then cost one stateless packet, never handshake state.
        if handshaking.load(Ordering::Relaxed) >= self.limits.retry_above_handshakes && can_retry {
            self.metrics.handshake_retries.inc();
            let _ = incoming.retry();
            return None;
        }
        Some(incoming)
    }
}

/// Counts a handshake in progress until dropped.
struct Handshake(Arc<AtomicUsize>);

impl Handshake {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    connection: quinn::Connection,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let alpn = transport::alpn(&connection);
    match alpn.as_deref() {
        Some(frame::ALPN_CLIENT) => {
            let _open = InFlight::start(&shared.metrics.client_connections);
            serve_client(connection, shared, tasks, shutdown).await;
        }
        Some(frame::ALPN_EXIT) => {
            transport::widen_for_tunnel(&connection);
            // An exit opens only its control stream.
            connection.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(1));
            serve_exit(connection, &shared, shutdown).await;
        }
        _ => connection.close(code::PROTOCOL, b"unknown ALPN"),
    }
}

/// One client connection: each bidirectional stream is one request. No address is logged,
/// and the per-stream spans carry no exit id, so neither logs nor traces can pair the two.
async fn serve_client(
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

/// One exit tunnel: the first stream the exit opens is its control stream, on which it
/// registers signed descriptors.
async fn serve_exit(connection: quinn::Connection, shared: &Shared, shutdown: CancellationToken) {
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
    let mut rate = token_bucket::TokenBucket::new(REGISTRATION_BURST, TUNNEL_REGISTRATIONS_PER_SEC);
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
        let allowed = shared
            .only_exits
            .as_deref()
            .is_none_or(|only| only.contains(&peer));
        let outcome = if !allowed {
            // Final, not `Overloaded`: a foreign exit must not keep retrying.
            Err((
                Status::Malformed,
                "this relay accepts only its own exit".to_owned(),
            ))
        } else if rate.take(std::time::Instant::now()) {
            register(registry, peer, &connection, bytes)
        } else {
            Err((
                Status::Overloaded,
                "registrations too frequent on this tunnel; retry later".to_owned(),
            ))
        };
        let (status, reason) = match outcome {
            Ok(outcome) => {
                registered = true;
                shared
                    .metrics
                    .registrations
                    .get_or_create(&crate::ops::metrics::RegistrationLabel {
                        outcome: (&outcome).into(),
                    })
                    .inc();
                // The exit's own address, with its own id: an exit is not a user.
                tracing::info!(%peer, addr = %connection.remote_address(), ?outcome, exits = registry.len(), "exit registered");
                (Status::Ok, String::new())
            }
            Err((status, reason)) => {
                shared
                    .metrics
                    .registrations
                    .get_or_create(&crate::ops::metrics::RegistrationLabel {
                        outcome: crate::ops::metrics::Registration::Refused,
                    })
                    .inc();
                // A flood's refusals (overloaded) are not worth a line each.
                if status == Status::Overloaded {
                    tracing::debug!(%peer, %reason, "exit registration refused");
                } else {
                    tracing::info!(%peer, %reason, "exit registration refused");
                }
                (status, reason)
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

fn register(
    registry: &Registry,
    peer: PeerId,
    connection: &quinn::Connection,
    bytes: Vec<u8>,
) -> Result<Registered, (Status, String)> {
    let malformed = |reason: String| (Status::Malformed, reason);
    let descriptor =
        SignedDescriptor::verify(&bytes, unix_now()).map_err(|e| malformed(e.to_string()))?;
    // The descriptor must belong to the identity this connection proved: otherwise an exit
    // could register (and hijack routing for) another exit's id.
    if descriptor.peer_id != peer {
        return Err(malformed(format!(
            "descriptor is for {} but the connection proved {peer}",
            descriptor.peer_id
        )));
    }
    registry
        .register(
            peer,
            connection,
            Bytes::from(bytes),
            descriptor.expires_at,
            descriptor.max_streams,
        )
        .map_err(|refused| (refused.status(), refused.to_string()))
}

async fn closed(connection: &quinn::Connection) {
    connection.closed().await;
}
