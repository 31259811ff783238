//! The swarm side of contacting DHT providers: reads the addresses a lookup learned for each
//! provider, dials the ones [`Selection`] chooses at the addresses it chooses (and only
//! those), and turns dial errors into [`Outcome`]s. The choosing itself is pure, in
//! [`super::selection`].

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr, PeerId, Swarm,
    core::{Endpoint, transport::PortUse},
    kad,
    swarm::{
        ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, THandler,
        THandlerInEvent, THandlerOutEvent, ToSwarm, dial_opts::DialOpts, dummy,
    },
};

use super::{
    Behaviour,
    selection::{Contact, Offered, Outcome, Selection},
};

/// A provider lookup ends after this many answers that named providers. rust-kad treats the
/// providers in an answer as peers to ask next, so a walk that goes on dials the addresses
/// of whatever records were planted near the key; the records themselves are in the first
/// answers from the peers that store them.
pub(super) const ENOUGH_PROVIDER_ANSWERS: usize = 3;

/// Ends a query in kad too (it stops asking and dialling peers).
pub(super) fn finish(swarm: &mut Swarm<Behaviour>, id: kad::QueryId) {
    if let Some(mut query) = swarm.behaviour_mut().kad.query_mut(&id) {
        query.finish();
    }
}

/// Refuses kad's own dials to providers. rust-kad takes the providers in an answer as peers to
/// ask next and dials them at every address their record lists (hundreds, for a planted record);
/// a provider is dialled only when the selection chooses it, at the addresses it chose. kad's
/// dials carry no addresses of their own (kad adds them from its tables), the selection's do.
#[derive(Debug, Default)]
pub(super) struct ProviderGate {
    providers: HashSet<PeerId>,
}

impl ProviderGate {
    /// `peer` is a provider: only dials with explicit addresses may reach it.
    pub(super) fn insert(&mut self, peer: PeerId) {
        self.providers.insert(peer);
    }

    /// Whether a dial to `peer` with these explicit addresses may go ahead.
    fn allows(&self, peer: Option<PeerId>, explicit: &[Multiaddr]) -> bool {
        !explicit.is_empty() || peer.is_none_or(|peer| !self.providers.contains(&peer))
    }
}

/// Why the gate refused a dial.
#[derive(Debug, thiserror::Error)]
#[error("a DHT provider is dialled only by the provider selection")]
struct ProviderDial;

impl NetworkBehaviour for ProviderGate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if self.allows(peer, addresses) {
            Ok(Vec::new())
        } else {
            Err(ConnectionDenied::new(ProviderDial))
        }
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// Providers being dialled by us, by connection.
#[derive(Debug, Default)]
pub(super) struct Dialling {
    by_connection: HashMap<ConnectionId, PeerId>,
}

impl Dialling {
    /// Whether nothing is being dialled.
    pub(super) fn is_empty(&self) -> bool {
        self.by_connection.is_empty()
    }

    /// A connection to `peer` is up (ours or anyone's): true when we were dialling it, which
    /// is then over.
    pub(super) fn connected(&mut self, peer: PeerId) -> bool {
        let before = self.by_connection.len();
        self.by_connection.retain(|_, p| *p != peer);
        self.by_connection.len() != before
    }

    /// Our dial `connection` failed: the provider it was for.
    pub(super) fn failed(&mut self, connection: ConnectionId) -> Option<PeerId> {
        self.by_connection.remove(&connection)
    }
}

/// The addresses kad holds for `peer` now: its routing table entry and what running queries
/// learned (a provider's record addresses, which kad forgets when the query ends). This is
/// kad's answer to "where would you dial it", asked without dialling.
pub(super) fn kad_addresses(swarm: &mut Swarm<Behaviour>, peer: PeerId) -> Vec<Multiaddr> {
    swarm
        .behaviour_mut()
        .kad
        .handle_pending_outbound_connection(
            ConnectionId::new_unchecked(0),
            Some(peer),
            &[],
            Endpoint::Dialer,
        )
        .unwrap_or_default()
}

/// What one lookup step's providers became.
#[derive(Debug, Default)]
pub(super) struct OfferedProviders {
    /// Providers queued for contact.
    pub(super) queued: usize,
    /// Providers listed without an allowed address (go servers list a provider without
    /// addresses once their peerstore forgot them): for peer routing.
    pub(super) unaddressed: Vec<PeerId>,
}

/// Offers the providers of one lookup step to the selection (before the query ends, while
/// kad still knows their addresses). Providers in `skip` (already verified) are left out.
pub(super) fn offer_providers(
    swarm: &mut Swarm<Behaviour>,
    selection: &mut Selection,
    result: &kad::GetProvidersResult,
    skip: impl Fn(&PeerId) -> bool,
) -> OfferedProviders {
    let mut offered = OfferedProviders::default();
    let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result else {
        return offered;
    };
    for peer in providers {
        swarm.behaviour_mut().gate.insert(*peer);
        if skip(peer) {
            continue;
        }
        let addrs = kad_addresses(swarm, *peer);
        match selection.offer(*peer, &addrs) {
            Offered::Queued => offered.queued += 1,
            Offered::Absurd => {
                tracing::info!(provider = %peer, addrs = addrs.len(), "provider not contacted: its record lists an absurd number of addresses");
            }
            Offered::NoAddress => {
                tracing::debug!(provider = %peer, "provider without an allowed address");
                offered.unaddressed.push(*peer);
            }
            Offered::Known => {}
        }
    }
    offered
}

/// Starts contacting every provider the selection lets through now: a relay-info request
/// right away to a peer already connected, otherwise a dial at the chosen addresses only
/// (the request follows when the connection is up). Returns the peers to ask now.
pub(super) fn contact_next(
    swarm: &mut Swarm<Behaviour>,
    selection: &mut Selection,
    dialling: &mut Dialling,
) -> Vec<PeerId> {
    let mut ask = Vec::new();
    while let Some(Contact { peer, addrs }) = selection.next_contact() {
        if swarm.is_connected(&peer) {
            ask.push(peer);
            continue;
        }
        let opts = DialOpts::peer_id(peer).addresses(addrs).build();
        let connection = opts.connection_id();
        match swarm.dial(opts) {
            Ok(()) => {
                dialling.by_connection.insert(connection, peer);
            }
            Err(error) => {
                tracing::info!(provider = %peer, "provider skipped: cannot dial it ({error})");
                selection.finished(peer, &outcome_of(&error));
            }
        }
    }
    ask
}

/// What a failed dial says about the provider and its addresses.
pub(super) fn outcome_of(error: &DialError) -> Outcome {
    match error {
        DialError::WrongPeerId { obtained, address } => Outcome::WrongPeer {
            addr: address.clone(),
            obtained: *obtained,
        },
        _ => Outcome::Failed,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;

    #[test]
    fn the_gate_lets_only_dials_with_explicit_addresses_reach_a_provider() {
        let provider = Keypair::generate_ed25519().public().to_peer_id();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let mut gate = ProviderGate::default();
        gate.insert(provider);
        let addr: Multiaddr = "/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap();
        assert!(!gate.allows(Some(provider), &[]));
        assert!(gate.allows(Some(provider), std::slice::from_ref(&addr)));
        assert!(gate.allows(Some(other), &[]));
        assert!(gate.allows(None, &[]));
    }
}
