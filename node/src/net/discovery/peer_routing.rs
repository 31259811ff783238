//! Peer routing for providers a seeker cannot dial: go-libp2p-kad-dht servers answer a
//! provider with the addresses their peerstore still holds, which is none from about 15
//! minutes after the provider's last connection to them. Such a provider is looked up by
//! its PeerId (kad FIND_NODE towards it), and the addresses that lookup returns go to the
//! provider selection like a record's (its bounds apply); one the lookup did not find may be
//! looked up once more when a later provider lookup of the same discovery lists it again.

use std::collections::HashMap;

use libp2p::{Multiaddr, PeerId, Swarm, kad};

use super::swarm::Behaviour;

/// Peer lookups one provider gets in one discovery at most.
const MAX_LOOKUPS_PER_PEER: u8 = 2;
/// Peer lookups one discovery starts at most: records without addresses cost DHT queries,
/// and a Sybil's thousand must not cost a thousand.
const MAX_LOOKUPS: usize = 16;

/// Peer lookups of one discovery.
#[derive(Debug, Default)]
pub(super) struct PeerRouting {
    /// Running lookups and whom they look for.
    running: HashMap<kad::QueryId, PeerId>,
    /// Lookups started per provider.
    started: HashMap<PeerId, u8>,
}

impl PeerRouting {
    /// `peer` could not be dialled with what the provider lookup gave: starts a lookup of
    /// its PeerId unless it had its share (a running lookup keeps the discovery from ending:
    /// see [`is_idle`](Self::is_idle)).
    pub(super) fn unreachable(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        let total: usize = self.started.values().map(|n| usize::from(*n)).sum();
        let started = self.started.entry(peer).or_default();
        if *started >= MAX_LOOKUPS_PER_PEER
            || total >= MAX_LOOKUPS
            || self.running.values().any(|p| *p == peer)
        {
            return;
        }
        *started += 1;
        let id = swarm.behaviour_mut().kad.get_closest_peers(peer);
        self.running.insert(id, peer);
        tracing::debug!(%peer, "provider without a reachable address: looking its PeerId up");
    }

    /// Whether no peer lookup runs.
    pub(super) fn is_idle(&self) -> bool {
        self.running.is_empty()
    }

    /// Handles the end of one of our lookups: the peer and the addresses it was found at,
    /// or the peer when the lookup found none. `None` for other queries.
    pub(super) fn on_result(
        &mut self,
        id: kad::QueryId,
        result: &kad::GetClosestPeersResult,
    ) -> Option<Result<(PeerId, Vec<Multiaddr>), PeerId>> {
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
            return Some(Err(peer));
        }
        Some(Ok((peer, addrs)))
    }
}
