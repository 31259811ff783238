//! The announcer's self-check: after a provider record is published, a throwaway DHT node
//! with a fresh identity looks the key up as a stranger would, and must get this node's
//! PeerId back and reach it through the addresses the DHT returned (an info request over
//! libp2p, which proves the PeerId). kad reports a provide as done once the messages are
//! queued, and go servers drop records without addresses, so only this says that others can
//! find the node.
//!
//! It cannot see a firewall in front of the host that lets the host reach itself (a hairpin
//! through the public address, cloud security groups): a verified announcement means "found
//! and reached from this host", an unverified one is certainly broken.

use std::time::Duration;

use futures_util::StreamExt as _;
use libp2p::{PeerId, identity::Keypair, kad, request_response, swarm::SwarmEvent};
use tokio_util::sync::CancellationToken;

use super::{
    DhtConfig, REQUERY,
    lookup::lookup_progress,
    policy::DialGuard,
    sleep_until,
    swarm::{BehaviourEvent, InfoSupport, Walk, add_bootstrap, build_swarm, on_identify},
};
use crate::ops::status::Verification;

/// What the announced node answers, so the check asks for the right one.
#[derive(Debug, Clone, Copy)]
pub(super) enum Asked {
    Relay,
    Exit,
}

/// Looks `key` up from a fresh identity until `me` is among the providers, then asks `me`
/// for its info through the addresses the lookup gave. `udp_port` names the port to open in
/// the failure reasons.
pub(super) async fn check(
    config: &DhtConfig,
    key: kad::RecordKey,
    me: PeerId,
    asked: Asked,
    udp_port: u16,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Verification {
    let unverified = |reason: String| Verification::Unverified { reason };
    let mut swarm = match build_swarm(
        Keypair::generate_ed25519(),
        config,
        DialGuard::default(),
        kad::Mode::Client,
        InfoSupport::ASK,
    ) {
        Ok(swarm) => swarm,
        Err(e) => return unverified(format!("cannot start the checking DHT node: {e}")),
    };
    if add_bootstrap(&mut swarm, config, Walk::LookupOnly) == 0 {
        return unverified("no usable bootstrap peer to check with".to_owned());
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut lookup = Some(swarm.behaviour_mut().kad.get_providers(key.clone()));
    let mut requery: Option<tokio::time::Instant> = None;
    let mut asking: Option<request_response::OutboundRequestId> = None;
    let mut lookups = 0u32;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Verification::Checking,
            () = tokio::time::sleep_until(deadline) => {
                return unverified(if asking.is_some() {
                    format!("the DHT returned this node but it did not answer in {timeout:?}; check that UDP port {udp_port} is open")
                } else {
                    format!("a fresh DHT node did not get this node's record back in {timeout:?} ({lookups} lookups)")
                });
            }
            () = sleep_until(requery) => {
                requery = None;
                lookup = Some(swarm.behaviour_mut().kad.get_providers(key.clone()));
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                    on_identify(&mut swarm, config, event);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                    id, result: kad::QueryResult::GetProviders(result), step, ..
                })) if Some(id) == lookup => {
                    let (providers, finished) = lookup_progress(&mut swarm, id, &result, &step);
                    if asking.is_none() && providers.contains(&me) {
                        // Ask while the lookup runs: its answers hold the addresses to dial.
                        asking = Some(match asked {
                            Asked::Relay => swarm.behaviour_mut().info.send_request(&me, ()),
                            Asked::Exit => swarm.behaviour_mut().exit_info.send_request(&me, ()),
                        });
                    }
                    if finished {
                        lookup = None;
                        lookups += 1;
                        if asking.is_none() {
                            requery = Some(tokio::time::Instant::now() + REQUERY);
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Info(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, .. }, ..
                })) | SwarmEvent::Behaviour(BehaviourEvent::ExitInfo(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, .. }, ..
                })) if Some(request_id) == asking => return Verification::Verified,
                SwarmEvent::Behaviour(BehaviourEvent::Info(request_response::Event::OutboundFailure {
                    request_id, error, ..
                })) | SwarmEvent::Behaviour(BehaviourEvent::ExitInfo(request_response::Event::OutboundFailure {
                    request_id, error, ..
                })) if Some(request_id) == asking => {
                    return unverified(format!(
                        "the DHT returned this node's record but a fresh node could not reach it there ({error}); check that UDP port {udp_port} is open to the internet and that the external address is right"
                    ));
                }
                _ => {}
            },
        }
    }
}
