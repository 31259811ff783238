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
use libp2p::{PeerId, Swarm, identity::Keypair, kad, request_response, swarm::SwarmEvent};
use tokio_util::sync::CancellationToken;

use super::{
    DhtConfig, REQUERY,
    lookup::lookup_progress,
    policy::DialGuard,
    sleep_until,
    swarm::{
        Behaviour, BehaviourEvent, InfoSupport, Walk, add_bootstrap, build_swarm, on_identify,
    },
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
    let mut checker = Checker::start(config, swarm, key, me, asked, udp_port);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Verification::Checking,
            () = tokio::time::sleep_until(deadline) => return checker.timed_out(timeout),
            () = sleep_until(checker.requery) => checker.on_requery(),
            event = checker.swarm.select_next_some() => {
                if let Some(verdict) = checker.on_swarm_event(event) {
                    return verdict;
                }
            }
        }
    }
}

fn unverified(reason: String) -> Verification {
    Verification::Unverified { reason }
}

/// One self-check under way: the checking node's swarm, its lookup of the key, and the info
/// request to the announced node once the lookup returned it.
struct Checker<'a> {
    config: &'a DhtConfig,
    swarm: Swarm<Behaviour>,
    key: kad::RecordKey,
    /// The announced node.
    me: PeerId,
    asked: Asked,
    /// The port to open, named in the failure reasons.
    udp_port: u16,
    /// The provider lookup running, if any.
    lookup: Option<kad::QueryId>,
    /// When to look the key up again.
    requery: Option<tokio::time::Instant>,
    /// The info request to the announced node, once sent.
    asking: Option<request_response::OutboundRequestId>,
    /// Lookups finished.
    lookups: u32,
}

impl<'a> Checker<'a> {
    /// Starts the lookup.
    fn start(
        config: &'a DhtConfig,
        mut swarm: Swarm<Behaviour>,
        key: kad::RecordKey,
        me: PeerId,
        asked: Asked,
        udp_port: u16,
    ) -> Self {
        let lookup = Some(swarm.behaviour_mut().kad.get_providers(key.clone()));
        Self {
            config,
            swarm,
            key,
            me,
            asked,
            udp_port,
            lookup,
            requery: None,
            asking: None,
            lookups: 0,
        }
    }

    /// The verdict when time is up.
    fn timed_out(&self, timeout: Duration) -> Verification {
        let udp_port = self.udp_port;
        let lookups = self.lookups;
        unverified(if self.asking.is_some() {
            format!(
                "the DHT returned this node but it did not answer in {timeout:?}; check that UDP port {udp_port} is open"
            )
        } else {
            format!(
                "a fresh DHT node did not get this node's record back in {timeout:?} ({lookups} lookups)"
            )
        })
    }

    fn on_requery(&mut self) {
        self.requery = None;
        self.lookup = Some(
            self.swarm
                .behaviour_mut()
                .kad
                .get_providers(self.key.clone()),
        );
    }

    /// Handles one swarm event; the verdict when it decides the check.
    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) -> Option<Verification> {
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
            SwarmEvent::Behaviour(BehaviourEvent::Info(request_response::Event::Message {
                message: request_response::Message::Response { request_id, .. },
                ..
            }))
            | SwarmEvent::Behaviour(BehaviourEvent::ExitInfo(request_response::Event::Message {
                message: request_response::Message::Response { request_id, .. },
                ..
            })) if Some(request_id) == self.asking => return Some(Verification::Verified),
            SwarmEvent::Behaviour(BehaviourEvent::Info(
                request_response::Event::OutboundFailure {
                    request_id, error, ..
                },
            ))
            | SwarmEvent::Behaviour(BehaviourEvent::ExitInfo(
                request_response::Event::OutboundFailure {
                    request_id, error, ..
                },
            )) if Some(request_id) == self.asking => {
                let udp_port = self.udp_port;
                return Some(unverified(format!(
                    "the DHT returned this node's record but a fresh node could not reach it there ({error}); check that UDP port {udp_port} is open to the internet and that the external address is right"
                )));
            }
            _ => {}
        }
        None
    }

    /// A step of the lookup: ask the announced node once it is among the providers.
    fn on_providers(
        &mut self,
        id: kad::QueryId,
        result: &kad::GetProvidersResult,
        step: &kad::ProgressStep,
    ) {
        let (providers, finished) = lookup_progress(&mut self.swarm, id, result, step);
        if self.asking.is_none() && providers.contains(&self.me) {
            // Ask while the lookup runs: its answers hold the addresses to dial.
            let behaviour = self.swarm.behaviour_mut();
            self.asking = Some(match self.asked {
                Asked::Relay => behaviour.info.send_request(&self.me, ()),
                Asked::Exit => behaviour.exit_info.send_request(&self.me, ()),
            });
        }
        if finished {
            self.lookup = None;
            self.lookups += 1;
            if self.asking.is_none() {
                self.requery = Some(tokio::time::Instant::now() + REQUERY);
            }
        }
    }
}
