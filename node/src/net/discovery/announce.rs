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
    Multiaddr,
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
        BehaviourEvent, InfoSupport, KadTuning, Walk, add_bootstrap, auto_confirmed,
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
    let Announcer {
        identity,
        listen,
        external_ips,
        mut info,
        status,
        metrics,
        guard,
    } = announcer;
    let role = info.role();
    let support = match info {
        Answer::Relay(_) => InfoSupport {
            relay: ProtocolSupport::Inbound,
            exit: ProtocolSupport::Outbound,
        },
        Answer::Exit { .. } => InfoSupport {
            relay: ProtocolSupport::Outbound,
            exit: ProtocolSupport::Inbound,
        },
    };
    let mut swarm = build_swarm_with(
        identity,
        config,
        guard,
        kad::Mode::Client,
        support,
        KadTuning::announce(&schedule),
    )?;
    let me = *swarm.local_peer_id();
    let asked = match info {
        Answer::Relay(_) => verification::Asked::Relay,
        Answer::Exit { .. } => verification::Asked::Exit,
    };
    let mut checks: JoinSet<Verification> = JoinSet::new();
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
    let key = info.key();
    let mut state = DhtStatus {
        state: DhtState::Starting,
        protocol: config.protocol.to_string(),
        listen_addrs: Vec::new(),
        external_addrs: Vec::new(),
        verification: Verification::NotYet,
    };
    status.send_replace(Some(state.clone()));
    let started = Instant::now();
    let mut next_publish: Option<tokio::time::Instant> = None;
    let mut retry = PUBLISH_RETRY_MIN;
    let mut publishing = false;
    let mut warned = false;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            () = sleep_until(next_publish) => {
                next_publish = None;
                if !swarm.external_addresses().any(|_| true) || !info.ready() {
                    continue;
                }
                match swarm.behaviour_mut().kad.start_providing(key.clone()) {
                    Ok(_) => publishing = true,
                    Err(error) => tracing::warn!(%error, "cannot store the provider record"),
                }
                continue;
            }
            Some(checked) = checks.join_next(), if !checks.is_empty() => {
                let Ok(checked) = checked else { continue };
                match &checked {
                    Verification::Verified => {
                        if state.verification != Verification::Verified {
                            tracing::info!(after = ?started.elapsed(), "{role} announcement verified: a fresh DHT node found and reached it");
                        }
                    }
                    Verification::Unverified { reason } => {
                        tracing::warn!("{role} announced on the DHT but UNVERIFIED: {reason}");
                    }
                    Verification::NotYet | Verification::Checking => continue,
                }
                metrics.provider_verified.set(i64::from(checked == Verification::Verified));
                state.verification = checked;
                status.send_replace(Some(state.clone()));
                continue;
            }
            () = info.ready_changed() => {
                let confirmed = swarm.external_addresses().any(|_| true);
                if confirmed && info.ready() && !publishing && state.state != DhtState::Announced
                    && next_publish.is_none()
                {
                    next_publish = Some(tokio::time::Instant::now());
                }
                continue;
            }
            event = swarm.select_next_some() => event,
        };
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let (usable, skipped) = external_for(&address, &external_ips);
                for addr in usable {
                    swarm.add_external_address(addr);
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
                if external_ips.is_empty() && auto_confirmed(config.policy, &address) {
                    swarm.add_external_address(address.clone());
                }
                state.listen_addrs.push(address.to_string());
                state.external_addrs = swarm
                    .external_addresses()
                    .map(ToString::to_string)
                    .collect();
                let confirmed = !state.external_addrs.is_empty();
                metrics.external_address_confirmed.set(i64::from(confirmed));
                if confirmed {
                    if !publishing && next_publish.is_none() {
                        next_publish = Some(tokio::time::Instant::now());
                    }
                } else {
                    state.state = DhtState::NoExternalAddress;
                    if !warned {
                        warned = true;
                        tracing::warn!(
                            policy = %config.policy,
                            "{role} has no confirmed external address, so it is NOT announced on the DHT (nobody would store its record); set external_addrs / --external-addr to its public IP"
                        );
                    }
                }
                status.send_replace(Some(state.clone()));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                on_identify(&mut swarm, config, event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result,
                stats,
                ..
            })) => {
                let outcome = match result {
                    kad::QueryResult::StartProviding(r) => Some((r.is_ok(), false)),
                    kad::QueryResult::RepublishProvider(r) => Some((r.is_ok(), true)),
                    _ => None,
                };
                let Some((ok, republish)) = outcome else {
                    continue;
                };
                publishing = false;
                // A lookup that reached no peer "succeeds" with nobody storing the record.
                if ok && stats.num_successes() > 0 {
                    metrics.provider_published.set(1);
                    retry = PUBLISH_RETRY_MIN;
                    if state.state != DhtState::Announced {
                        tracing::info!(
                            after = ?started.elapsed(),
                            republish,
                            every = ?schedule.republish,
                            "{role} announced on the DHT; checking from a fresh identity that it is found and reachable"
                        );
                    }
                    state.state = DhtState::Announced;
                    if checks.is_empty() {
                        if state.verification == Verification::NotYet {
                            state.verification = Verification::Checking;
                        }
                        let config = config.clone();
                        let key = key.clone();
                        let port = state
                            .external_addrs
                            .first()
                            .and_then(|a| a.parse::<Multiaddr>().ok())
                            .and_then(|a| udp_port(&a))
                            .unwrap_or(listen.port());
                        let timeout = schedule.verify_timeout;
                        let shutdown = shutdown.clone();
                        checks.spawn(async move {
                            verification::check(&config, key, me, asked, port, timeout, &shutdown)
                                .await
                        });
                    }
                } else {
                    metrics.provider_published.set(0);
                    state.state = DhtState::PublishFailed;
                    tracing::warn!(retry_in = ?retry, "announcing on the DHT failed: no DHT peer stored the record");
                    next_publish = Some(tokio::time::Instant::now() + retry);
                    retry = (retry * 2).min(PUBLISH_RETRY_MAX);
                }
                status.send_replace(Some(state.clone()));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Info(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            })) => {
                if let Answer::Relay(source) = &info
                    && let Some(answer) = source()
                {
                    let _ = swarm.behaviour_mut().info.send_response(channel, answer);
                }
                // `None`: the channel is dropped unanswered (only tests do this).
            }
            SwarmEvent::Behaviour(BehaviourEvent::ExitInfo(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            })) => {
                if let Answer::Exit { info: source, .. } = &info
                    && let Some(answer) = source()
                {
                    let _ = swarm
                        .behaviour_mut()
                        .exit_info
                        .send_response(channel, answer);
                }
            }
            _ => {}
        }
    }
    Ok(())
}
