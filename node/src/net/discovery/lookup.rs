//! The swarm side of contacting DHT providers: reads the addresses a lookup learned for each
//! provider, dials the ones [`Selection`] chooses at the addresses it chooses (and only
//! those), and turns dial errors into [`Outcome`]s. The choosing itself is pure, in
//! [`super::selection`].

use std::collections::HashMap;

use libp2p::{
    Multiaddr, PeerId, Swarm,
    core::Endpoint,
    kad,
    swarm::{ConnectionId, DialError, NetworkBehaviour as _, dial_opts::DialOpts},
};

use super::{
    selection::{Contact, Offered, Outcome, Selection},
    swarm::Behaviour,
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

/// One step of a provider lookup: the providers it reported, and whether the lookup is over
/// (then it is finished in kad too, so it stops asking peers).
pub(super) fn lookup_progress(
    swarm: &mut Swarm<Behaviour>,
    id: kad::QueryId,
    result: &kad::GetProvidersResult,
    step: &kad::ProgressStep,
) -> (Vec<PeerId>, bool) {
    let providers = match result {
        Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
            providers.iter().copied().collect()
        }
        _ => Vec::new(),
    };
    let finished = step.last || !matches!(result, Ok(kad::GetProvidersOk::FoundProviders { .. }));
    if finished {
        finish(swarm, id);
    }
    (providers, finished)
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
