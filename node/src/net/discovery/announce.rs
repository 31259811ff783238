//! Announcing a relay or an exit: its swarm publishes the provider record once the node has a
//! confirmed external address (and an exit a relay), republishes it on schedule, retries
//! failures with backoff, checks each publication from a fresh identity, and answers
//! relay-info or exit-info to those who find it.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use libp2p::{
    Multiaddr, Swarm,
    identity::Keypair,
    kad,
    request_response::{self, ProtocolSupport},
    swarm::SwarmEvent,
};
use tokengo_proto::{
    exit_info::{self, SignedExitInfo},
    relay_info::{self, RelayInfo},
};
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    AnnounceSchedule, DhtConfig, DiscoveryError,
    policy::DialGuard,
    sleep_until,
    swarm::{
        Behaviour, BehaviourEvent, InfoSupport, KadTuning, Walk, add_bootstrap, auto_confirmed,
        build_swarm_with, external_for, on_identify, quic_multiaddr, udp_port,
    },
    verification,
};
use crate::ops::{
    metrics::DhtMetrics,
    status::{DhtState, DhtStatus, Verification},
};

/// Retry bounds for a failed announcement.
const PUBLISH_RETRY_MIN: Duration = Duration::from_secs(5);
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(300);

/// What a relay says about itself on `/tokengo/relay-info/1`; `None` means "do not answer".
pub type InfoSource = Arc<dyn Fn() -> Option<RelayInfo> + Send + Sync>;

/// What an exit says about itself on `/tokengo/exit-info/1`; `None` means "do not answer".
pub type ExitInfoSource = Arc<dyn Fn() -> Option<SignedExitInfo> + Send + Sync>;

/// What an announcing node provides on the DHT and answers to those who find it.
#[derive(Clone)]
pub enum Answer {
    /// A relay: provides the relay key, answers relay-info.
    Relay(InfoSource),
    /// An exit: provides the exit key once `registered` turns true (an exit without a relay
    /// cannot be reached), answers exit-info.
    Exit {
        /// Its signed exit-info.
        info: ExitInfoSource,
        /// True while the exit is registered with at least one relay.
        registered: watch::Receiver<bool>,
    },
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Answer").field(&self.role()).finish()
    }
}

impl Answer {
    fn key(&self) -> kad::RecordKey {
        match self {
            Self::Relay(_) => {
                kad::RecordKey::new(&relay_info::provider_key(relay_info::RELAY_NAMESPACE))
            }
            Self::Exit { .. } => kad::RecordKey::new(&exit_info::provider_key()),
        }
    }

    fn role(&self) -> &'static str {
        match self {
            Self::Relay(_) => "relay",
            Self::Exit { .. } => "exit",
        }
    }

    /// Answers its own info protocol, asks the other.
    fn support(&self) -> InfoSupport {
        match self {
            Self::Relay(_) => InfoSupport {
                relay: ProtocolSupport::Inbound,
                exit: ProtocolSupport::Outbound,
            },
            Self::Exit { .. } => InfoSupport {
                relay: ProtocolSupport::Outbound,
                exit: ProtocolSupport::Inbound,
            },
        }
    }

    /// What the self-check asks for.
    fn asked(&self) -> verification::Asked {
        match self {
            Self::Relay(_) => verification::Asked::Relay,
            Self::Exit { .. } => verification::Asked::Exit,
        }
    }

    /// Whether there is something worth announcing yet.
    fn ready(&self) -> bool {
        match self {
            Self::Relay(_) => true,
            Self::Exit { registered, .. } => *registered.borrow(),
        }
    }

    /// Returns when readiness may have changed (never for a relay).
    async fn ready_changed(&mut self) {
        if let Self::Exit { registered, .. } = self
            && registered.changed().await.is_ok()
        {
            return;
        }
        std::future::pending().await
    }
}

/// What a relay or an exit announces with.
pub struct Announcer {
    /// The node's identity: for a relay the same key as its QUIC certificate, for an exit the
    /// key its descriptor names, so one PeerId for both.
    pub identity: Keypair,
    /// UDP address of the libp2p swarm. Default `0.0.0.0:4001`.
    pub listen: SocketAddr,
    /// Confirmed external IPs (configured `external_addrs`).
    pub external_ips: Vec<IpAddr>,
    /// What it provides and answers.
    pub info: Answer,
    /// Where the announcement stands (read by `/status`).
    pub status: Arc<watch::Sender<Option<DhtStatus>>>,
    /// The relay's DHT metrics.
    pub metrics: DhtMetrics,
    /// Address policy bookkeeping (refused dials, test observer).
    pub guard: DialGuard,
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer")
            .field("listen", &self.listen)
            .field("external_ips", &self.external_ips)
            .finish_non_exhaustive()
    }
}

/// Announces a relay or an exit until `shutdown`: publishes the provider record once it has a
/// confirmed external address, a reachable DHT and (an exit) a relay, retries failures with
/// backoff, answers relay-info or exit-info. A node without a confirmed address is reported
/// (warning, metric, `/status`), not hidden. Uses the default [`AnnounceSchedule`].
pub async fn announce(
    config: &DhtConfig,
    announcer: Announcer,
    shutdown: CancellationToken,
) -> Result<(), DiscoveryError> {
    announce_with(config, announcer, AnnounceSchedule::default(), shutdown).await
}

/// [`announce`] on a given schedule: the record is published again every
/// `schedule.republish`, and after each publication a fresh identity checks that it finds
/// and reaches the node ([`Verification`] in `/status`, metric `dht_provider_verified`).
pub async fn announce_with(
    config: &DhtConfig,
    announcer: Announcer,
    schedule: AnnounceSchedule,
    shutdown: CancellationToken,
) -> Result<(), DiscoveryError> {
    let mut announcing = Announcing::start(config, announcer, schedule, shutdown.clone())?;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = sleep_until(announcing.next_publish) => announcing.on_publish_due(),
            Some(checked) = announcing.checks.join_next(), if !announcing.checks.is_empty() => {
                announcing.on_checked(checked);
            }
            () = announcing.info.ready_changed() => announcing.on_ready_changed(),
            event = announcing.swarm.select_next_some() => announcing.on_swarm_event(event),
        }
    }
    Ok(())
}

/// One announcement under way: the swarm and what it answers, where the announcement stands
/// (mirrored to `/status`), the publication timer and its backoff, and the self-check
/// running. Each event it waits for is one method.
struct Announcing<'a> {
    config: &'a DhtConfig,
    schedule: AnnounceSchedule,
    swarm: Swarm<Behaviour>,
    info: Answer,
    role: &'static str,
    /// The provider key published.
    key: kad::RecordKey,
    /// Configured external IPs.
    external_ips: Vec<IpAddr>,
    /// The configured listen address (its port is the one to open, failing all else).
    listen: SocketAddr,
    status: Arc<watch::Sender<Option<DhtStatus>>>,
    metrics: DhtMetrics,
    /// Passed on to the self-checks.
    shutdown: CancellationToken,
    /// Where the announcement stands.
    state: DhtStatus,
    started: Instant,
    /// When to publish next, if a publication is due.
    next_publish: Option<tokio::time::Instant>,
    /// How long to wait after the next failed publication.
    retry: Duration,
    /// A publication runs.
    publishing: bool,
    /// The missing external address was warned about.
    warned: bool,
    /// The self-check after a publication (one at a time).
    checks: JoinSet<Verification>,
}

impl<'a> Announcing<'a> {
    /// Builds the swarm, listens and adds the bootstrap peers; reports `Starting`.
    fn start(
        config: &'a DhtConfig,
        announcer: Announcer,
        schedule: AnnounceSchedule,
        shutdown: CancellationToken,
    ) -> Result<Self, DiscoveryError> {
        let Announcer {
            identity,
            listen,
            external_ips,
            info,
            status,
            metrics,
            guard,
        } = announcer;
        let role = info.role();
        let mut swarm = build_swarm_with(
            identity,
            config,
            guard,
            kad::Mode::Client,
            info.support(),
            KadTuning::announce(&schedule),
        )?;
        let listen_addr = quic_multiaddr(listen);
        swarm
            .listen_on(listen_addr.clone())
            .map_err(|e| DiscoveryError::Listen {
                addr: listen_addr,
                reason: e.to_string(),
            })?;
        let bootstrap_peers = add_bootstrap(&mut swarm, config, Walk::Bootstrap);
        if bootstrap_peers == 0 {
            tracing::warn!("no usable bootstrap peer: the {role} cannot announce itself");
        }
        let state = DhtStatus {
            state: DhtState::Starting,
            protocol: config.protocol.to_string(),
            listen_addrs: Vec::new(),
            external_addrs: Vec::new(),
            verification: Verification::NotYet,
        };
        status.send_replace(Some(state.clone()));
        Ok(Self {
            config,
            schedule,
            swarm,
            key: info.key(),
            info,
            role,
            external_ips,
            listen,
            status,
            metrics,
            shutdown,
            state,
            started: Instant::now(),
            next_publish: None,
            retry: PUBLISH_RETRY_MIN,
            publishing: false,
            warned: false,
            checks: JoinSet::new(),
        })
    }

    /// Mirrors the state to `/status`.
    fn report(&self) {
        self.status.send_replace(Some(self.state.clone()));
    }

    fn has_external_address(&self) -> bool {
        self.swarm.external_addresses().any(|_| true)
    }

    /// Publishes the provider record, if there is an address to publish and (an exit) a
    /// relay to be reached through.
    fn on_publish_due(&mut self) {
        self.next_publish = None;
        if !self.has_external_address() || !self.info.ready() {
            return;
        }
        match self
            .swarm
            .behaviour_mut()
            .kad
            .start_providing(self.key.clone())
        {
            Ok(_) => self.publishing = true,
            Err(error) => tracing::warn!(%error, "cannot store the provider record"),
        }
    }

    /// A self-check ended.
    fn on_checked(&mut self, checked: Result<Verification, tokio::task::JoinError>) {
        let Ok(checked) = checked else { return };
        let role = self.role;
        match &checked {
            Verification::Verified => {
                if self.state.verification != Verification::Verified {
                    tracing::info!(after = ?self.started.elapsed(), "{role} announcement verified: a fresh DHT node found and reached it");
                }
            }
            Verification::Unverified { reason } => {
                tracing::warn!("{role} announced on the DHT but UNVERIFIED: {reason}");
            }
            Verification::NotYet | Verification::Checking => return,
        }
        self.metrics
            .provider_verified
            .set(i64::from(checked == Verification::Verified));
        self.state.verification = checked;
        self.report();
    }

    /// An exit's registration changed: publish now if it was waiting for that.
    fn on_ready_changed(&mut self) {
        if self.has_external_address()
            && self.info.ready()
            && !self.publishing
            && self.state.state != DhtState::Announced
            && self.next_publish.is_none()
        {
            self.next_publish = Some(tokio::time::Instant::now());
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => self.on_listen_addr(&address),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                on_identify(&mut self.swarm, self.config, event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result,
                stats,
                ..
            })) => {
                let published = match result {
                    kad::QueryResult::StartProviding(r) => Some((r.is_ok(), false)),
                    kad::QueryResult::RepublishProvider(r) => Some((r.is_ok(), true)),
                    _ => None,
                };
                if let Some((ok, republish)) = published {
                    self.on_published(ok, republish, &stats);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Info(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            })) => {
                if let Answer::Relay(source) = &self.info
                    && let Some(answer) = source()
                {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .info
                        .send_response(channel, answer);
                }
                // `None`: the channel is dropped unanswered (only tests do this).
            }
            SwarmEvent::Behaviour(BehaviourEvent::ExitInfo(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            })) => {
                if let Answer::Exit { info: source, .. } = &self.info
                    && let Some(answer) = source()
                {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .exit_info
                        .send_response(channel, answer);
                }
            }
            _ => {}
        }
    }

    /// The swarm listens on `address`: the external addresses it confirms, and a publication
    /// as soon as there is one (a warning, once, while there is none).
    fn on_listen_addr(&mut self, address: &Multiaddr) {
        self.confirm_external(address);
        self.state.listen_addrs.push(address.to_string());
        self.state.external_addrs = self
            .swarm
            .external_addresses()
            .map(ToString::to_string)
            .collect();
        let confirmed = !self.state.external_addrs.is_empty();
        self.metrics
            .external_address_confirmed
            .set(i64::from(confirmed));
        if confirmed {
            if !self.publishing && self.next_publish.is_none() {
                self.next_publish = Some(tokio::time::Instant::now());
            }
        } else {
            self.state.state = DhtState::NoExternalAddress;
            if !self.warned {
                self.warned = true;
                let role = self.role;
                tracing::warn!(
                    policy = %self.config.policy,
                    "{role} has no confirmed external address, so it is NOT announced on the DHT (nobody would store its record); set external_addrs / --external-addr to its public IP"
                );
            }
        }
        self.report();
    }

    /// Adds the external addresses a new listener makes reachable.
    fn confirm_external(&mut self, address: &Multiaddr) {
        let (usable, skipped) = external_for(address, &self.external_ips);
        for addr in usable {
            self.swarm.add_external_address(addr);
        }
        if !skipped.is_empty() {
            tracing::warn!(
                listen = %address,
                ?skipped,
                "external addresses of another IP family than the DHT listener are not announced (nobody could reach them); listen on [::] or an IPv6 address to announce IPv6"
            );
        }
        // Configured addresses say how the node is reached; only without them does
        // loopback confirm itself.
        if self.external_ips.is_empty() && auto_confirmed(self.config.policy, address) {
            self.swarm.add_external_address(address.clone());
        }
    }

    /// A publication (or kad's republication) ended.
    fn on_published(&mut self, ok: bool, republish: bool, stats: &kad::QueryStats) {
        self.publishing = false;
        // A lookup that reached no peer "succeeds" with nobody storing the record.
        if ok && stats.num_successes() > 0 {
            self.on_announced(republish);
        } else {
            self.metrics.provider_published.set(0);
            self.state.state = DhtState::PublishFailed;
            tracing::warn!(retry_in = ?self.retry, "announcing on the DHT failed: no DHT peer stored the record");
            self.next_publish = Some(tokio::time::Instant::now() + self.retry);
            self.retry = (self.retry * 2).min(PUBLISH_RETRY_MAX);
        }
        self.report();
    }

    /// Some DHT peer stored the record: announced; check it from a fresh identity.
    fn on_announced(&mut self, republish: bool) {
        self.metrics.provider_published.set(1);
        self.retry = PUBLISH_RETRY_MIN;
        if self.state.state != DhtState::Announced {
            let role = self.role;
            tracing::info!(
                after = ?self.started.elapsed(),
                republish,
                every = ?self.schedule.republish,
                "{role} announced on the DHT; checking from a fresh identity that it is found and reachable"
            );
        }
        self.state.state = DhtState::Announced;
        if self.checks.is_empty() {
            if self.state.verification == Verification::NotYet {
                self.state.verification = Verification::Checking;
            }
            self.spawn_check();
        }
    }

    /// Starts the self-check of the announcement just published.
    fn spawn_check(&mut self) {
        let config = self.config.clone();
        let key = self.key.clone();
        let me = *self.swarm.local_peer_id();
        let asked = self.info.asked();
        let port = self
            .state
            .external_addrs
            .first()
            .and_then(|a| a.parse::<Multiaddr>().ok())
            .and_then(|a| udp_port(&a))
            .unwrap_or(self.listen.port());
        let timeout = self.schedule.verify_timeout;
        let shutdown = self.shutdown.clone();
        self.checks.spawn(async move {
            verification::check(&config, key, me, asked, port, timeout, &shutdown).await
        });
    }
}
