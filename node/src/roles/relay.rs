//! The relay: accepts exits on their reverse tunnels and clients on theirs, and copies each
//! client stream to the exit it names. It never decrypts, never parses bodies, and never logs a
//! client's address together with an exit.

mod admission;
mod clients;
pub mod config;
mod registry;
mod slots;
mod source;
mod token_bucket;
mod tunnel;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use libp2p_identity::{Keypair, PeerId};
use tokengo_proto::frame::{self};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::config::RelayConfig;
pub use registry::{MAX_INFO_BYTES, MAX_LIST_BYTES, Refused, Registered, Registry};

use crate::{
    clock::unix_now,
    config::{
        Limits,
        defaults::{DRAIN_DEADLINE, MAX_CLIENT_STREAMS},
    },
    net::stream::code,
    net::transport::{self, RelayAddr, TransportParams},
    ops::metrics::{InFlight, RelayMetrics},
    store::{identity, keys::KeySource},
};

/// Loads the relay's identity (created on first start in the data directory; only read from
/// a read-only `--keys-dir`) and binds its QUIC endpoint.
pub fn start(config: &RelayConfig) -> anyhow::Result<(Relay, Keypair)> {
    // The data directory holds writable state whatever the keys' place is.
    config.data_dir.ensure()?;
    let keys = KeySource::of(&config.data_dir, config.keys_dir.as_deref());
    let (identity, created) = keys.identity(tokengo_proto::data_dir::RELAY_IDENTITY_FILE)?;
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
                tokengo_proto::frame::ALPN_CLIENT.to_vec(),
                tokengo_proto::frame::ALPN_EXIT.to_vec(),
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
            clients::serve(connection, shared, tasks, shutdown).await;
        }
        Some(frame::ALPN_EXIT) => {
            transport::widen_for_tunnel(&connection);
            // An exit opens only its control stream.
            connection.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(1));
            tunnel::serve(connection, &shared, shutdown).await;
        }
        _ => connection.close(code::PROTOCOL, b"unknown ALPN"),
    }
}
