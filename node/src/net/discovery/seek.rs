//! Seeking relays: a throwaway DHT node with a fresh identity looks the relay key up while
//! the cached relays are probed, asks each provider the selection lets through for its
//! relay-info, and verifies every candidate before it is used.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use libp2p::{PeerId, identity::Keypair, kad, request_response, swarm::SwarmEvent};
use tokengo_proto::relay_info;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    DhtConfig, DiscoveryError, REQUERY,
    cache::{RelayCache, VerifiedRelay, rank},
    lookup, peer_routing,
    policy::{self, DialGuard},
    probe::{Probed, Source, probe_budget, quic_candidates, spawn_verify},
    selection::{self, Selection, SelectionLimits},
    sleep_until,
    swarm::{BehaviourEvent, InfoSupport, Walk, add_bootstrap, build_swarm, on_identify},
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
    let mut swarm = build_swarm(
        Keypair::generate_ed25519(),
        config,
        seek.guard.clone(),
        kad::Mode::Client,
        InfoSupport::ASK,
    )?;
    let mut probes: JoinSet<Probed> = JoinSet::new();
    // Cached relays only dedupe among themselves: a cached PeerId must not block the same
    // relay's fresh DHT record (its cached address may be the stale one).
    let mut tried: HashSet<PeerId> = HashSet::new();
    let mut selection = Selection::new(SelectionLimits::default(), config.policy);
    let mut dialling = lookup::Dialling::default();
    let mut probe_ips: HashMap<PeerId, IpAddr> = HashMap::new();
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
    let peers = add_bootstrap(&mut swarm, config, Walk::LookupOnly);
    tracing::info!(
        bootstrap_peers = peers,
        cached = probes.len(),
        protocol = %config.protocol,
        "discovering relays on the DHT"
    );
    let key = kad::RecordKey::new(&relay_info::provider_key(relay_info::RELAY_NAMESPACE));
    let mut lookup = (peers > 0).then(|| swarm.behaviour_mut().kad.get_providers(key.clone()));
    let mut requery: Option<tokio::time::Instant> = None;
    let mut provider_answers = 0usize;
    let mut pending: HashMap<request_response::OutboundRequestId, PeerId> = HashMap::new();
    let mut verified: Vec<VerifiedRelay> = Vec::new();
    let mut first_usable: Option<Instant> = None;
    let mut found = 0usize;
    let mut skipped = 0usize;
    let mut routing = peer_routing::PeerRouting::default();
    loop {
        if verified.len() >= seek.want.max(1) {
            break;
        }
        for peer in lookup::contact_next(&mut swarm, &mut selection, &mut dialling) {
            let request = swarm.behaviour_mut().info.send_request(&peer, ());
            pending.insert(request, peer);
        }
        let idle = lookup.is_none()
            && pending.is_empty()
            && probes.is_empty()
            && dialling.is_empty()
            && selection.is_idle()
            && routing.is_idle();
        // Done: something verified and nothing is pending; or nothing can ever come (no DHT
        // peer to ask and no cached relay left, or every provider this discovery may contact
        // was contacted).
        if idle && (!verified.is_empty() || peers == 0 || !selection.has_budget()) {
            break;
        }
        // Every provider found so far failed: look again (a relay may announce a moment
        // later, or move).
        if idle && requery.is_none() {
            requery = Some(tokio::time::Instant::now() + REQUERY);
        }
        let settle = first_usable.map(|t| tokio::time::Instant::from_std(t + seek.settle));
        tokio::select! {
            () = shutdown.cancelled() => return Err(DiscoveryError::Cancelled),
            () = tokio::time::sleep_until(deadline) => break,
            () = sleep_until(settle) => break,
            () = sleep_until(requery) => {
                requery = None;
                provider_answers = 0;
                lookup = Some(swarm.behaviour_mut().kad.get_providers(key.clone()));
            }
            Some(done) = probes.join_next(), if !probes.is_empty() => {
                let Ok(Probed { source, peer, outcome }) = done else { continue };
                if matches!(source, Source::Dht) {
                    if let (Err(_), Some(ip)) = (&outcome, probe_ips.get(&peer)) {
                        selection.probe_failed(peer, *ip);
                    }
                    probe_ips.remove(&peer);
                    selection.finished(peer, &selection::Outcome::Answered);
                }
                match outcome {
                    Ok(relay) => {
                        tracing::info!(relay = %peer, ?source, rtt = ?relay.rtt, exits = relay.exits, "relay verified");
                        first_usable.get_or_insert_with(Instant::now);
                        verified.push(relay);
                        // The cache and the DHT may both verify one relay: count it once.
                        rank(&mut verified);
                    }
                    Err(reason) => {
                        skipped += 1;
                        tracing::info!(relay = %peer, ?source, "relay skipped: {reason}");
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                    on_identify(&mut swarm, config, event);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                    id, result: kad::QueryResult::GetProviders(result), step, ..
                })) if Some(id) == lookup => {
                    // Offered now: kad knows the providers' addresses only while the lookup
                    // runs. Those it lists without addresses (go servers, once their
                    // peerstore forgot them) are looked up by PeerId.
                    let offered = lookup::offer_providers(&mut swarm, &mut selection, &result, |peer| {
                        verified.iter().any(|r| r.addr.peer_id() == *peer)
                    });
                    found += offered.queued;
                    for peer in offered.unaddressed {
                        routing.unreachable(&mut swarm, peer);
                    }
                    let (providers, mut finished) = lookup::lookup_progress(&mut swarm, id, &result, &step);
                    if !providers.is_empty() {
                        provider_answers += 1;
                    }
                    if !finished && provider_answers >= lookup::ENOUGH_PROVIDER_ANSWERS {
                        lookup::finish(&mut swarm, id);
                        finished = true;
                    }
                    if finished {
                        lookup = None;
                        tracing::info!(providers = found, selection = ?selection.stats(), after = ?started.elapsed(), "DHT lookup finished");
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } if dialling.connected(peer_id) => {
                    if let Some(ip) = policy::ip_of(endpoint.get_remote_address()) {
                        selection.reached(ip);
                    }
                    let request = swarm.behaviour_mut().info.send_request(&peer_id, ());
                    pending.insert(request, peer_id);
                }
                SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                    if let Some(peer) = dialling.failed(connection_id) {
                        skipped += 1;
                        tracing::info!(relay = %peer, "relay skipped: cannot connect ({error})");
                        let outcome = lookup::outcome_of(&error);
                        selection.finished(peer, &outcome);
                        // The record's addresses may be stale: the peer's own may differ.
                        if matches!(outcome, selection::Outcome::Failed) {
                            routing.unreachable(&mut swarm, peer);
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                    id, result: kad::QueryResult::GetClosestPeers(result), ..
                })) => match routing.on_result(id, &result) {
                    // Found addresses are DHT hints like a record's: the selection's bounds
                    // apply to them too.
                    Some(Ok((peer, addrs))) if selection.offer(peer, &addrs) == selection::Offered::Queued => {
                        found += 1;
                    }
                    Some(Err(peer)) => {
                        skipped += 1;
                        tracing::info!(relay = %peer, "relay skipped for now: the DHT has no reachable address for it, and a lookup of its PeerId found none");
                    }
                    Some(Ok(_)) | None => {}
                },
                SwarmEvent::Behaviour(BehaviourEvent::Info(request_response::Event::Message {
                    peer,
                    message: request_response::Message::Response { request_id, response },
                    ..
                })) => {
                    if pending.remove(&request_id).is_none() {
                        continue;
                    }
                    let candidate = quic_candidates(&response, peer, config.policy, &seek.guard)
                        .and_then(|addr| probe_budget(&selection, addr));
                    match candidate {
                        Ok(addr) => {
                            if let Some(ip) = policy::ip_of(&addr.to_multiaddr()) {
                                probe_ips.insert(peer, ip);
                            }
                            spawn_verify(&mut probes, Source::Dht, addr, &seek.guard, seek.params, config.policy);
                        }
                        Err(reason) => {
                            skipped += 1;
                            selection.finished(peer, &selection::Outcome::Answered);
                            tracing::info!(relay = %peer, "relay skipped: {reason}");
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Info(request_response::Event::OutboundFailure {
                    peer, request_id, error, ..
                })) => {
                    if pending.remove(&request_id).is_none() {
                        continue;
                    }
                    skipped += 1;
                    // Connected, so something lives at its address: no failure of the IP.
                    selection.finished(peer, &selection::Outcome::Answered);
                    tracing::info!(relay = %peer, "relay skipped: no relay-info answer ({error})");
                }
                _ => {}
            },
        }
    }
    let elapsed = started.elapsed();
    rank(&mut verified);
    seek.metrics
        .relays_verified
        .set(i64::try_from(verified.len()).unwrap_or(i64::MAX));
    let Some(first) = first_usable else {
        return Err(DiscoveryError::NoRelay {
            secs: elapsed.as_secs(),
        });
    };
    if let Some(cache) = &seek.cache
        && let Err(error) = cache.save(&verified, unix_now())
    {
        tracing::warn!(%error, "cannot write the relay cache");
    }
    tracing::info!(
        relays = verified.len(),
        skipped,
        selection = ?selection.stats(),
        first_usable = ?first.duration_since(started),
        elapsed = ?elapsed,
        "discovery done"
    );
    Ok(Discovered {
        relays: verified,
        first_usable: first.duration_since(started),
        elapsed,
        skipped,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
