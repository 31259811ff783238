//! Keeps kad's own dials away from DHT providers: only the provider selection dials them,
//! at the addresses it chose (see [`super::lookup`]).

use std::{
    collections::HashSet,
    convert::Infallible,
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr, PeerId,
    core::{Endpoint, transport::PortUse},
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm, dummy,
    },
};

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

#[cfg(test)]
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
