//! Seeking relays: a throwaway DHT node with a fresh identity looks the relay key up while
//! the cached relays are probed, asks each provider the selection lets through for its
//! relay-info, and verifies every candidate before it is used.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use libp2p::{
    PeerId, Swarm,
    core::ConnectedPoint,
    identity::Keypair,
    kad, request_response,
    swarm::{ConnectionId, DialError, SwarmEvent},
};
use tokengo_proto::relay_info::{self, RelayInfo};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    DhtConfig, DiscoveryError, REQUERY, Step,
    cache::{RelayCache, VerifiedRelay, rank},
    lookup, peer_routing,
    policy::{self, DialGuard},
    probe::{Probed, Source, probe_budget, quic_candidates, spawn_verify},
    selection::{self, Selection, SelectionLimits},
    sleep_until,
    swarm::{
        Behaviour, BehaviourEvent, InfoSupport, Walk, add_bootstrap, build_swarm, on_identify,
    },
};
use crate::{
    clock::unix_now,
    net::transport::{RelayAddr, TransportParams},
    ops::metrics::DhtMetrics,
};

/// What a client or exit looks for.
#[derive(Debug, Clone)]
pub struct Seek {
    /// Cache of known-good relays (read first, rewritten with what verified).
    pub cache: Option<RelayCache>,
    /// Stop once this many relays verified.
    pub want: usize,
    /// After the first relay verified, wait at most this long for more. Default 1 s.
    pub settle: Duration,
    /// QUIC parameters of the verification probe.
    pub params: TransportParams,
    /// Address policy bookkeeping (refused dials, test observer).
    pub guard: DialGuard,
    /// The caller's DHT metrics.
    pub metrics: DhtMetrics,
}

impl Seek {
    /// What a role seeks with: dials the address policy refuses are counted in `metrics`
    /// (`dials_refused`), and the verified relays are reported there.
    #[must_use]
    pub fn new(
        cache: Option<RelayCache>,
        want: usize,
        settle: Duration,
        params: TransportParams,
        metrics: &DhtMetrics,
    ) -> Self {
        Self {
            cache,
            want,
            settle,
            params,
            guard: DialGuard {
                refused: metrics.dials_refused.clone(),
                observer: None,
            },
            metrics: metrics.clone(),
        }
    }
}

/// What a discovery found.
#[derive(Debug, Clone)]
pub struct Discovered {
    /// Verified relays, best first (see [`rank`]).
    pub relays: Vec<VerifiedRelay>,
    /// From the start until the first relay verified.
    pub first_usable: Duration,
    /// From the start until discovery ended.
    pub elapsed: Duration,
    /// Providers skipped (no relay-info answer, or verification failed).
    pub skipped: usize,
}

/// The relays to use after a discovery: the verified ones, best first; when neither the DHT
/// nor the cache yielded any, the configured fallback relays (their identity is still proven
/// by TLS when they are dialled). Other failures (shutdown) are passed on.
pub fn or_fallback(
    found: Result<Discovered, DiscoveryError>,
    fallback: &[RelayAddr],
) -> Result<Vec<RelayAddr>, DiscoveryError> {
    match found {
        Ok(found) => Ok(found.relays.into_iter().map(|r| r.addr).collect()),
        Err(DiscoveryError::NoRelay { secs }) if !fallback.is_empty() => {
            tracing::warn!(
                secs,
                fallback = fallback.len(),
                "no relay found on the DHT or in the cache; using the configured fallback relays"
            );
            Ok(fallback.to_vec())
        }
        Err(e) => Err(e),
    }
}

/// Finds and verifies relays: the cache and the DHT in parallel. The libp2p identity is
/// fresh for every call, so nothing on the DHT links two starts of the same user.
pub async fn discover(
    config: &DhtConfig,
    seek: Seek,
    shutdown: &CancellationToken,
) -> Result<Discovered, DiscoveryError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + config.timeout;
    let mut seeker = Seeker::start(config, seek, started)?;
    while seeker.advance() == Step::Wait {
        let settle = seeker.settle_at();
        // The deadline and the settle time end the discovery with what verified so far.
        tokio::select! {
            () = shutdown.cancelled() => return Err(DiscoveryError::Cancelled),
            () = tokio::time::sleep_until(deadline) => break,
            () = sleep_until(settle) => break,
            () = sleep_until(seeker.requery) => seeker.on_requery(),
            Some(done) = seeker.probes.join_next(), if !seeker.probes.is_empty() => {
                seeker.on_probe_done(done);
            }
            event = seeker.swarm.select_next_some() => seeker.on_swarm_event(event),
        }
    }
    seeker.finish()
}

/// One discovery under way: its swarm, the relays being probed, the provider selection and
/// lookup, and what it counted. Each event it waits for is one method.
struct Seeker<'a> {
    config: &'a DhtConfig,
    seek: Seek,
    swarm: Swarm<Behaviour>,
    /// The relays' provider key.
    key: kad::RecordKey,
    started: Instant,
    /// Bootstrap peers added (none: the DHT cannot be asked at all).
    bootstrap_peers: usize,
    probes: JoinSet<Probed>,
    /// The IP each DHT candidate is probed at, charged to it when the probe fails.
    probe_ips: HashMap<PeerId, IpAddr>,
    selection: Selection,
    dialling: lookup::Dialling,
    routing: peer_routing::PeerRouting,
    /// The provider lookup running, if any.
    lookup: Option<kad::QueryId>,
    /// When to look the key up again.
    requery: Option<tokio::time::Instant>,
    /// Answers of the running lookup that named providers.
    provider_answers: usize,
    /// Relay-info requests in flight, and whom they ask.
    pending: HashMap<request_response::OutboundRequestId, PeerId>,
    verified: Vec<VerifiedRelay>,
    first_usable: Option<Instant>,
    /// Providers queued for contact.
    found: usize,
    /// Providers and cached relays not used.
    skipped: usize,
}

impl<'a> Seeker<'a> {
    /// Builds the swarm, starts probing the cached relays and starts the provider lookup.
    fn start(config: &'a DhtConfig, seek: Seek, started: Instant) -> Result<Self, DiscoveryError> {
        let mut swarm = build_swarm(
            Keypair::generate_ed25519(),
            config,
            seek.guard.clone(),
            kad::Mode::Client,
            InfoSupport::ASK,
        )?;
        let probes = probe_cached(config, &seek);
        let bootstrap_peers = add_bootstrap(&mut swarm, config, Walk::LookupOnly);
        tracing::info!(
            bootstrap_peers,
            cached = probes.len(),
            protocol = %config.protocol,
            "discovering relays on the DHT"
        );
        let key = kad::RecordKey::new(&relay_info::provider_key(relay_info::RELAY_NAMESPACE));
        let lookup =
            (bootstrap_peers > 0).then(|| swarm.behaviour_mut().kad.get_providers(key.clone()));
        Ok(Self {
            config,
            selection: Selection::new(SelectionLimits::default(), config.policy),
            seek,
            swarm,
            key,
            started,
            bootstrap_peers,
            probes,
            probe_ips: HashMap::new(),
            dialling: lookup::Dialling::default(),
            routing: peer_routing::PeerRouting::default(),
            lookup,
            requery: None,
            provider_answers: 0,
            pending: HashMap::new(),
            verified: Vec::new(),
            first_usable: None,
            found: 0,
            skipped: 0,
        })
    }

    /// Contacts the providers the selection lets through now, then says whether anything
    /// more can come.
    fn advance(&mut self) -> Step {
        if self.verified.len() >= self.seek.want.max(1) {
            return Step::Done;
        }
        for peer in lookup::contact_next(&mut self.swarm, &mut self.selection, &mut self.dialling) {
            self.ask(peer);
        }
        let idle = self.is_idle();
        // Done: something verified and nothing is pending; or nothing can ever come (no DHT
        // peer to ask and no cached relay left, or every provider this discovery may contact
        // was contacted).
        if idle
            && (!self.verified.is_empty()
                || self.bootstrap_peers == 0
                || !self.selection.has_budget())
        {
            return Step::Done;
        }
        // Every provider found so far failed: look again (a relay may announce a moment
        // later, or move).
        if idle && self.requery.is_none() {
            self.requery = Some(tokio::time::Instant::now() + REQUERY);
        }
        Step::Wait
    }

    /// Whether nothing runs: no lookup, request, probe, dial or peer lookup, and nobody
    /// queued for contact.
    fn is_idle(&self) -> bool {
        self.lookup.is_none()
            && self.pending.is_empty()
            && self.probes.is_empty()
            && self.dialling.is_empty()
            && self.selection.is_idle()
            && self.routing.is_idle()
    }

    /// When the wait for better relays after the first one ends.
    fn settle_at(&self) -> Option<tokio::time::Instant> {
        self.first_usable
            .map(|t| tokio::time::Instant::from_std(t + self.seek.settle))
    }

    /// Asks `peer` for its relay-info.
    fn ask(&mut self, peer: PeerId) {
        let request = self.swarm.behaviour_mut().info.send_request(&peer, ());
        self.pending.insert(request, peer);
    }

    fn on_requery(&mut self) {
        self.requery = None;
        self.provider_answers = 0;
        self.lookup = Some(
            self.swarm
                .behaviour_mut()
                .kad
                .get_providers(self.key.clone()),
        );
    }

    fn on_probe_done(&mut self, done: Result<Probed, tokio::task::JoinError>) {
        let Ok(Probed {
            source,
            peer,
            outcome,
        }) = done
        else {
            return;
        };
        if matches!(source, Source::Dht) {
            if let (Err(_), Some(ip)) = (&outcome, self.probe_ips.get(&peer)) {
                self.selection.probe_failed(peer, *ip);
            }
            self.probe_ips.remove(&peer);
            self.selection.finished(peer, &selection::Outcome::Answered);
        }
        match outcome {
            Ok(relay) => {
                tracing::info!(relay = %peer, ?source, rtt = ?relay.rtt, exits = relay.exits, "relay verified");
                self.first_usable.get_or_insert_with(Instant::now);
                self.verified.push(relay);
                // The cache and the DHT may both verify one relay: count it once.
                rank(&mut self.verified);
            }
            Err(reason) => {
                self.skipped += 1;
                tracing::info!(relay = %peer, ?source, "relay skipped: {reason}");
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                on_identify(&mut self.swarm, self.config, event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            })) if Some(id) == self.lookup => self.on_providers(id, &result, &step),
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } if self.dialling.connected(peer_id) => self.on_connected(peer_id, &endpoint),
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => self.on_dial_failed(connection_id, &error),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                ..
            })) => self.on_peer_found(id, &result),
            SwarmEvent::Behaviour(BehaviourEvent::Info(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            })) => self.on_relay_info(peer, request_id, &response),
            SwarmEvent::Behaviour(BehaviourEvent::Info(
                request_response::Event::OutboundFailure {
                    peer,
                    request_id,
                    error,
                    ..
                },
            )) => self.on_no_relay_info(peer, request_id, &error),
            _ => {}
        }
    }

    /// A step of the provider lookup.
    fn on_providers(
        &mut self,
        id: kad::QueryId,
        result: &kad::GetProvidersResult,
        step: &kad::ProgressStep,
    ) {
        // Offered now: kad knows the providers' addresses only while the lookup runs. Those
        // it lists without addresses (go servers, once their peerstore forgot them) are
        // looked up by PeerId.
        let offered =
            lookup::offer_providers(&mut self.swarm, &mut self.selection, result, |peer| {
                self.verified.iter().any(|r| r.addr.peer_id() == *peer)
            });
        self.found += offered.queued;
        for peer in offered.unaddressed {
            self.routing.unreachable(&mut self.swarm, peer);
        }
        let (providers, mut finished) = lookup::lookup_progress(&mut self.swarm, id, result, step);
        if !providers.is_empty() {
            self.provider_answers += 1;
        }
        if !finished && self.provider_answers >= lookup::ENOUGH_PROVIDER_ANSWERS {
            lookup::finish(&mut self.swarm, id);
            finished = true;
        }
        if finished {
            self.lookup = None;
            tracing::info!(providers = self.found, selection = ?self.selection.stats(), after = ?self.started.elapsed(), "DHT lookup finished");
        }
    }

    /// Our dial to a provider succeeded: ask it.
    fn on_connected(&mut self, peer: PeerId, endpoint: &ConnectedPoint) {
        if let Some(ip) = policy::ip_of(endpoint.get_remote_address()) {
            self.selection.reached(ip);
        }
        self.ask(peer);
    }

    fn on_dial_failed(&mut self, connection: ConnectionId, error: &DialError) {
        let Some(peer) = self.dialling.failed(connection) else {
            return;
        };
        self.skipped += 1;
        tracing::info!(relay = %peer, "relay skipped: cannot connect ({error})");
        let outcome = lookup::outcome_of(error);
        self.selection.finished(peer, &outcome);
        // The record's addresses may be stale: the peer's own may differ.
        if matches!(outcome, selection::Outcome::Failed) {
            self.routing.unreachable(&mut self.swarm, peer);
        }
    }

    /// A peer lookup of a provider without a reachable address ended.
    fn on_peer_found(&mut self, id: kad::QueryId, result: &kad::GetClosestPeersResult) {
        match self.routing.on_result(id, result) {
            // Found addresses are DHT hints like a record's: the selection's bounds apply to
            // them too.
            Some(Ok((peer, addrs)))
                if self.selection.offer(peer, &addrs) == selection::Offered::Queued =>
            {
                self.found += 1;
            }
            Some(Err(peer)) => {
                self.skipped += 1;
                tracing::info!(relay = %peer, "relay skipped for now: the DHT has no reachable address for it, and a lookup of its PeerId found none");
            }
            Some(Ok(_)) | None => {}
        }
    }

    /// A provider answered relay-info: probe the address it gives, if it may be.
    fn on_relay_info(
        &mut self,
        peer: PeerId,
        request: request_response::OutboundRequestId,
        info: &RelayInfo,
    ) {
        if self.pending.remove(&request).is_none() {
            return;
        }
        let candidate = quic_candidates(info, peer, self.config.policy, &self.seek.guard)
            .and_then(|addr| probe_budget(&self.selection, addr));
        match candidate {
            Ok(addr) => {
                if let Some(ip) = policy::ip_of(&addr.to_multiaddr()) {
                    self.probe_ips.insert(peer, ip);
                }
                spawn_verify(
                    &mut self.probes,
                    Source::Dht,
                    addr,
                    &self.seek.guard,
                    self.seek.params,
                    self.config.policy,
                );
            }
            Err(reason) => {
                self.skipped += 1;
                self.selection.finished(peer, &selection::Outcome::Answered);
                tracing::info!(relay = %peer, "relay skipped: {reason}");
            }
        }
    }

    fn on_no_relay_info(
        &mut self,
        peer: PeerId,
        request: request_response::OutboundRequestId,
        error: &request_response::OutboundFailure,
    ) {
        if self.pending.remove(&request).is_none() {
            return;
        }
        self.skipped += 1;
        // Connected, so something lives at its address: no failure of the IP.
        self.selection.finished(peer, &selection::Outcome::Answered);
        tracing::info!(relay = %peer, "relay skipped: no relay-info answer ({error})");
    }

    /// The result: the verified relays, best first (also into the cache and the metric).
    fn finish(mut self) -> Result<Discovered, DiscoveryError> {
        let elapsed = self.started.elapsed();
        rank(&mut self.verified);
        self.seek
            .metrics
            .relays_verified
            .set(i64::try_from(self.verified.len()).unwrap_or(i64::MAX));
        let Some(first) = self.first_usable else {
            return Err(DiscoveryError::NoRelay {
                secs: elapsed.as_secs(),
            });
        };
        if let Some(cache) = &self.seek.cache
            && let Err(error) = cache.save(&self.verified, unix_now())
        {
            tracing::warn!(%error, "cannot write the relay cache");
        }
        tracing::info!(
            relays = self.verified.len(),
            skipped = self.skipped,
            selection = ?self.selection.stats(),
            first_usable = ?first.duration_since(self.started),
            elapsed = ?elapsed,
            "discovery done"
        );
        Ok(Discovered {
            relays: self.verified,
            first_usable: first.duration_since(self.started),
            elapsed,
            skipped: self.skipped,
        })
    }
}

/// Starts probing the cached relays.
fn probe_cached(config: &DhtConfig, seek: &Seek) -> JoinSet<Probed> {
    let mut probes = JoinSet::new();
    // Cached relays only dedupe among themselves: a cached PeerId must not block the same
    // relay's fresh DHT record (its cached address may be the stale one).
    let mut tried: HashSet<PeerId> = HashSet::new();
    let cached = seek
        .cache
        .as_ref()
        .map(|c| c.load(unix_now()))
        .unwrap_or_default();
    for addr in cached {
        if tried.insert(addr.peer_id()) {
            spawn_verify(
                &mut probes,
                Source::Cache,
                addr,
                &seek.guard,
                seek.params,
                config.policy,
            );
        }
    }
    probes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_relays_are_used_only_when_nothing_was_found() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let fallback = vec![RelayAddr::new(([127, 0, 0, 1], 4433).into(), peer)];
        let none = || Err(DiscoveryError::NoRelay { secs: 3 });
        assert_eq!(or_fallback(none(), &fallback).unwrap(), fallback);
        assert!(matches!(
            or_fallback(none(), &[]),
            Err(DiscoveryError::NoRelay { secs: 3 })
        ));
        assert!(matches!(
            or_fallback(Err(DiscoveryError::Cancelled), &fallback),
            Err(DiscoveryError::Cancelled)
        ));
        let found = Discovered {
            relays: vec![],
            first_usable: Duration::ZERO,
            elapsed: Duration::ZERO,
            skipped: 0,
        };
        assert!(or_fallback(Ok(found), &fallback).unwrap().is_empty());
    }
}
