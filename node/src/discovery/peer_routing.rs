//! Peer routing for providers a seeker cannot dial: go-libp2p-kad-dht servers answer a
//! provider with the addresses their peerstore still holds, which is none from about 15
//! minutes after the provider's last connection to them. Such a provider is looked up by
//! its PeerId (kad FIND_NODE towards it) and dialled at the addresses that lookup returns;
//! one the lookup did not find may be tried again when a later provider lookup of the same
//! discovery lists it again.

use std::collections::{HashMap, HashSet};

use libp2p::{
    Multiaddr, PeerId, Swarm, kad,
    swarm::dial_opts::{DialOpts, PeerCondition},
};

use super::Behaviour;

/// Peer lookups one provider gets in one discovery at most.
const MAX_LOOKUPS_PER_PEER: u8 = 2;

/// Peer lookups of one discovery.
#[derive(Debug, Default)]
pub(super) struct PeerRouting {
    /// Running lookups and whom they look for.
    running: HashMap<kad::QueryId, PeerId>,
    /// Lookups started per provider.
    started: HashMap<PeerId, u8>,
    /// Providers a lookup did not find, which a later provider answer may bring back.
    unfound: HashSet<PeerId>,
}

impl PeerRouting {
    /// `peer` could not be dialled with what the provider lookup gave: starts a lookup of
    /// its PeerId unless it had its share. True when one started (the caller waits for it).
    pub(super) fn unreachable(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) -> bool {
        let started = self.started.entry(peer).or_default();
        if *started >= MAX_LOOKUPS_PER_PEER || self.running.values().any(|p| *p == peer) {
            return false;
        }
        *started += 1;
        let id = swarm.behaviour_mut().kad.get_closest_peers(peer);
        self.running.insert(id, peer);
        tracing::debug!(%peer, "provider without a reachable address: looking its PeerId up");
        true
    }

    /// Whether a provider the lookup lists again may be asked again: one whose peer lookup
    /// found nothing and that has lookups left.
    pub(super) fn may_retry(&mut self, peer: &PeerId) -> bool {
        let left = self.started.get(peer).copied().unwrap_or(0) < MAX_LOOKUPS_PER_PEER;
        left && self.unfound.remove(peer)
    }

    /// Whether no peer lookup runs.
    pub(super) fn is_idle(&self) -> bool {
        self.running.is_empty()
    }

    /// Handles the end of one of our lookups: when it found the peer with addresses, dials
    /// it there and returns it (the caller sends its request now; request-response uses the
    /// connection being dialled). Returns `None` for other queries and for peers not found.
    pub(super) fn on_result(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        id: kad::QueryId,
        result: &kad::GetClosestPeersResult,
    ) -> Option<Result<PeerId, PeerId>> {
        let peer = self.running.remove(&id)?;
        let peers = match result {
            Ok(ok) => &ok.peers,
            Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
        };
        let addrs: Vec<Multiaddr> = peers
            .iter()
            .filter(|p| p.peer_id == peer)
            .flat_map(|p| p.addrs.iter().cloned())
            .collect();
        if addrs.is_empty() {
            self.unfound.insert(peer);
            return Some(Err(peer));
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(error) = swarm.dial(opts) {
            tracing::debug!(%peer, %error, "cannot dial a looked-up provider");
            self.unfound.insert(peer);
            return Some(Err(peer));
        }
        Some(Ok(peer))
    }
}
