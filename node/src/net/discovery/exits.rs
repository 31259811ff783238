//! Exits on the DHT, learned independently of any single relay: what an announcing exit
//! answers on `/tokengo/exit-info/1` (its descriptor and the relays it is registered with,
//! signed by its identity), and the lookup a client runs to find exits and their relays.
//!
//! A lookup proves that each exit it returns said, under its own identity and recently, which
//! relays it uses; it does not prove that those relays host it now (the caller's relay
//! connection, TLS-bound to the relay's PeerId, and the relay's exit list show that) nor that
//! the exit is honest: anyone can announce exits (a Sybil can announce many), so DHT exits are
//! candidates to corroborate, never a reason to trust one exit more.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, Swarm,
    identity::Keypair,
    kad,
    request_response::{self, OutboundRequestId},
    swarm::SwarmEvent,
};
use tokengo_proto::{
    descriptor::{Descriptor, SignedDescriptor},
    exit_info::{self, ExitInfo, ExitInfoError, SignedExitInfo},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    DhtConfig, DiscoveryError, REQUERY, Step,
    announce::ExitInfoSource,
    lookup::lookup_progress,
    policy::{AddressPolicy, DialGuard},
    sleep_until,
    swarm::{
        Behaviour, BehaviourEvent, InfoSupport, Walk, add_bootstrap, build_swarm, on_identify,
    },
};
use crate::{clock::unix_now, net::transport::RelayAddr};

/// Exits a lookup returns at most, by default.
pub const DEFAULT_MAX_EXITS: usize = 16;
/// Providers asked for exit-info in one lookup at most, by default: a bound on the work a
/// DHT full of Sybil records can cause.
pub const DEFAULT_MAX_PROVIDERS: usize = 64;

/// Limits of one exit lookup (the time limit is the DHT config's `timeout`).
#[derive(Debug, Clone)]
pub struct ExitLookup {
    /// Stop once this many exits verified. Default [`DEFAULT_MAX_EXITS`].
    pub want: usize,
    /// Ask at most this many providers. Default [`DEFAULT_MAX_PROVIDERS`].
    pub max_providers: usize,
    /// After the first exit verified, wait at most this long for more. Default 1 s.
    pub settle: Duration,
    /// Address policy bookkeeping (refused dials, test observer).
    pub guard: DialGuard,
}

impl Default for ExitLookup {
    fn default() -> Self {
        Self {
            want: DEFAULT_MAX_EXITS,
            max_providers: DEFAULT_MAX_PROVIDERS,
            settle: super::DEFAULT_SETTLE,
            guard: DialGuard::default(),
        }
    }
}

/// An exit found on the DHT. Everything in it was checked: the exit-info signature by the
/// exit's identity, that identity being the provider that answered, the descriptor (signature,
/// PeerId, not expired), the answer's age, and each relay address against the address policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundExit {
    /// The verified descriptor (its `peer_id` is the exit's).
    pub descriptor: Descriptor,
    /// The descriptor's wire bytes as the exit signed them (what a relay lists for it too).
    pub descriptor_bytes: Vec<u8>,
    /// When the exit signed its answer (Unix seconds).
    pub issued_at: u64,
    /// The relays the exit says it is registered with, in its order, those the address policy
    /// allows (never empty). Not dialled yet: connecting proves each relay's PeerId, and its
    /// exit list shows whether it hosts the exit.
    pub relays: Vec<RelayAddr>,
}

impl FoundExit {
    /// The exit's identity (its descriptor's PeerId, proven by the exit-info signature and by
    /// the libp2p connection it answered on).
    #[must_use]
    pub fn peer_id(&self) -> PeerId {
        self.descriptor.peer_id
    }
}

/// Why an exit-info answer was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExitRefusal {
    /// The answer itself is refused (signature, descriptor, age, encoding).
    #[error("{0}")]
    Invalid(#[from] ExitInfoError),
    /// The answer is signed by another identity than the provider that answered, e.g. a
    /// provider replaying another exit's answer.
    #[error("exit-info of {signer} served by another peer")]
    NotTheProvider {
        /// Whose answer it is.
        signer: PeerId,
    },
    /// No relay in it can be used (none listed, or none a QUIC multiaddr with `/p2p/` that
    /// the address policy allows).
    #[error(
        "exit-info names no usable relay ({listed} listed, {refused} outside the address policy)"
    )]
    NoUsableRelay {
        /// Relays listed.
        listed: usize,
        /// Relays the address policy refused.
        refused: usize,
    },
}

/// Checks one exit-info answer from `provider` at time `now`.
pub fn verify_answer(
    answer: &SignedExitInfo,
    provider: PeerId,
    now: u64,
    policy: AddressPolicy,
    guard: &DialGuard,
) -> Result<FoundExit, ExitRefusal> {
    let verified = answer.verify(now)?;
    let signer = verified.descriptor.peer_id;
    if signer != provider {
        return Err(ExitRefusal::NotTheProvider { signer });
    }
    let listed = verified.relays.len();
    let mut refused = 0;
    let mut relays: Vec<RelayAddr> = Vec::new();
    for bytes in verified.relays {
        let Ok(addr) = Multiaddr::try_from(bytes) else {
            continue;
        };
        let Ok(relay) = addr.to_string().parse::<RelayAddr>() else {
            continue;
        };
        if !policy.allows(&addr) {
            refused += 1;
            if let Some(observer) = &guard.observer {
                observer(&addr, false);
            }
            guard.refused.inc();
            continue;
        }
        if !relays.contains(&relay) {
            relays.push(relay);
        }
    }
    if relays.is_empty() {
        return Err(ExitRefusal::NoUsableRelay { listed, refused });
    }
    Ok(FoundExit {
        descriptor: verified.descriptor,
        descriptor_bytes: verified.descriptor_bytes,
        issued_at: verified.issued_at,
        relays,
    })
}

/// Looks exits up on the DHT: finds the providers of the exit key with a fresh libp2p
/// identity (nothing links two lookups of one user), asks each for its exit-info, and returns
/// the exits whose answers verified (see [`FoundExit`]), at most `lookup.want`, in the order
/// they answered. Ends at the first of: enough exits, `lookup.settle` after the first one,
/// every provider answered, or the config's `timeout` (a lookup that finds nothing is repeated
/// every 2 s until then, so with no exit on the DHT it takes the whole timeout: run it beside
/// relay discovery, not before it). Finding nothing is not an error (an empty list): exits are
/// also learned from relays. Errors: the swarm cannot start, or `shutdown` fired.
pub async fn find_exits(
    config: &DhtConfig,
    lookup: ExitLookup,
    shutdown: &CancellationToken,
) -> Result<Vec<FoundExit>, DiscoveryError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + config.timeout;
    let mut swarm = build_swarm(
        Keypair::generate_ed25519(),
        config,
        lookup.guard.clone(),
        kad::Mode::Client,
        InfoSupport::ASK,
    )?;
    if add_bootstrap(&mut swarm, config, Walk::LookupOnly) == 0 {
        tracing::info!("no DHT bootstrap peer: no exit lookup");
        return Ok(Vec::new());
    }
    let mut seeker = ExitSeeker::start(config, lookup, swarm);
    while seeker.advance() == Step::Wait {
        let settle = seeker.first.map(|t| t + seeker.lookup.settle);
        tokio::select! {
            () = shutdown.cancelled() => return Err(DiscoveryError::Cancelled),
            () = tokio::time::sleep_until(deadline) => break,
            () = sleep_until(settle) => break,
            () = sleep_until(seeker.requery) => seeker.on_requery(),
            event = seeker.swarm.select_next_some() => seeker.on_swarm_event(event),
        }
    }
    tracing::info!(
        exits = seeker.found.len(),
        asked = seeker.asked.len(),
        skipped = seeker.skipped,
        elapsed = ?started.elapsed(),
        "exit lookup done"
    );
    Ok(seeker.found)
}

/// One exit lookup under way: its swarm, the providers asked, the exits verified. Each event
/// it waits for is one method.
struct ExitSeeker<'a> {
    config: &'a DhtConfig,
    lookup: ExitLookup,
    swarm: Swarm<Behaviour>,
    /// The exits' provider key.
    key: kad::RecordKey,
    /// The provider lookup running, if any.
    query: Option<kad::QueryId>,
    /// When to look the key up again.
    requery: Option<tokio::time::Instant>,
    /// Exit-info requests in flight, and whom they ask.
    pending: HashMap<OutboundRequestId, PeerId>,
    /// Providers asked (at most `lookup.max_providers`).
    asked: HashSet<PeerId>,
    found: Vec<FoundExit>,
    /// When the first exit verified.
    first: Option<tokio::time::Instant>,
    skipped: usize,
}

impl<'a> ExitSeeker<'a> {
    /// Starts the provider lookup.
    fn start(config: &'a DhtConfig, lookup: ExitLookup, mut swarm: Swarm<Behaviour>) -> Self {
        let key = kad::RecordKey::new(&exit_info::provider_key());
        let query = Some(swarm.behaviour_mut().kad.get_providers(key.clone()));
        Self {
            config,
            lookup,
            swarm,
            key,
            query,
            requery: None,
            pending: HashMap::new(),
            asked: HashSet::new(),
            found: Vec::new(),
            first: None,
            skipped: 0,
        }
    }

    /// Whether more exits can come; arms the requery when nothing runs.
    fn advance(&mut self) -> Step {
        let idle = self.query.is_none() && self.pending.is_empty();
        let exhausted = self.asked.len() >= self.lookup.max_providers;
        if self.found.len() >= self.lookup.want.max(1)
            || (idle && (!self.found.is_empty() || exhausted))
        {
            return Step::Done;
        }
        if idle && self.requery.is_none() {
            self.requery = Some(tokio::time::Instant::now() + REQUERY);
        }
        Step::Wait
    }

    fn on_requery(&mut self) {
        self.requery = None;
        self.query = Some(
            self.swarm
                .behaviour_mut()
                .kad
                .get_providers(self.key.clone()),
        );
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
            })) if Some(id) == self.query => self.on_providers(id, &result, &step),
            SwarmEvent::Behaviour(BehaviourEvent::ExitInfo(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            })) => self.on_exit_info(peer, request_id, &response),
            SwarmEvent::Behaviour(BehaviourEvent::ExitInfo(
                request_response::Event::OutboundFailure {
                    peer,
                    request_id,
                    error,
                    ..
                },
            )) => {
                self.pending.remove(&request_id);
                self.skipped += 1;
                tracing::info!(provider = %peer, "exit skipped: no exit-info answer ({error})");
            }
            _ => {}
        }
    }

    /// A step of the provider lookup: ask the providers it named, while there is budget.
    fn on_providers(
        &mut self,
        id: kad::QueryId,
        result: &kad::GetProvidersResult,
        step: &kad::ProgressStep,
    ) {
        let (providers, finished) = lookup_progress(&mut self.swarm, id, result, step);
        for peer in providers {
            if self.asked.len() < self.lookup.max_providers && self.asked.insert(peer) {
                // Ask now: kad knows the provider's addresses only while the lookup runs.
                let request = self.swarm.behaviour_mut().exit_info.send_request(&peer, ());
                self.pending.insert(request, peer);
            }
        }
        if finished {
            self.query = None;
        }
    }

    fn on_exit_info(&mut self, peer: PeerId, request: OutboundRequestId, answer: &SignedExitInfo) {
        self.pending.remove(&request);
        let now = unix_now();
        match verify_answer(answer, peer, now, self.config.policy, &self.lookup.guard) {
            Ok(exit) => {
                tracing::info!(exit = %peer, relays = exit.relays.len(), "exit verified on the DHT");
                self.first.get_or_insert_with(tokio::time::Instant::now);
                self.found.push(exit);
            }
            Err(reason) => {
                self.skipped += 1;
                tracing::info!(provider = %peer, "exit skipped: {reason}");
            }
        }
    }
}

/// What the exit signed last, reused while nothing it says has changed.
struct Signed {
    descriptor: Vec<u8>,
    relays: Vec<Vec<u8>>,
    issued_at: u64,
    answer: SignedExitInfo,
}

/// What an exit answers on exit-info: its current descriptor and the relays it is registered
/// with now, signed with `identity`. Re-signed when either changes, and when the last
/// signature is older than [`exit_info::RESIGN_AFTER_SECS`]. No answer before the exit has a
/// descriptor.
#[must_use]
pub fn exit_info_source(
    identity: Keypair,
    descriptor: watch::Receiver<Option<SignedDescriptor>>,
    relays: watch::Receiver<Vec<RelayAddr>>,
) -> ExitInfoSource {
    let last: Mutex<Option<Signed>> = Mutex::new(None);
    Arc::new(move || {
        let descriptor = descriptor.borrow().as_ref()?.as_bytes().to_vec();
        let relays: Vec<Vec<u8>> = relays
            .borrow()
            .iter()
            .map(|r| r.to_multiaddr().to_vec())
            .collect();
        let now = unix_now();
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(signed) = last.as_ref()
            && signed.descriptor == descriptor
            && signed.relays == relays
            && now.saturating_sub(signed.issued_at) < exit_info::RESIGN_AFTER_SECS
        {
            return Some(signed.answer.clone());
        }
        let info = ExitInfo {
            issued_at: now,
            descriptor,
            relays,
        };
        match SignedExitInfo::sign(&info, &identity) {
            Ok(answer) => {
                *last = Some(Signed {
                    descriptor: info.descriptor,
                    relays: info.relays,
                    issued_at: now,
                    answer: answer.clone(),
                });
                Some(answer)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot sign the exit-info answer; not answering");
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengo_proto::key_config::KeyConfig;

    fn signed_descriptor(key: &Keypair, issued_at: u64) -> SignedDescriptor {
        let desc = Descriptor {
            peer_id: key.public().to_peer_id(),
            key_configs: vec![KeyConfig {
                key_id: 1,
                public_key: [7; 32],
            }],
            models: vec!["m".into()],
            issued_at,
            expires_at: issued_at + 24 * 3600,
            max_streams: 8,
            access_token_required: false,
        };
        SignedDescriptor::sign(&desc, key).unwrap()
    }

    fn relay(ip: [u8; 4]) -> RelayAddr {
        RelayAddr::new(
            (ip, 4433).into(),
            Keypair::generate_ed25519().public().to_peer_id(),
        )
    }

    fn answer(key: &Keypair, relays: &[RelayAddr]) -> SignedExitInfo {
        let info = ExitInfo {
            issued_at: unix_now(),
            descriptor: signed_descriptor(key, unix_now() - 5).as_bytes().to_vec(),
            relays: relays.iter().map(|r| r.to_multiaddr().to_vec()).collect(),
        };
        SignedExitInfo::sign(&info, key).unwrap()
    }

    #[test]
    fn an_answer_verifies_only_from_its_own_exit_and_with_usable_relays() {
        let key = Keypair::generate_ed25519();
        let exit = key.public().to_peer_id();
        let (lo, lan) = (relay([127, 0, 0, 1]), relay([10, 0, 0, 1]));
        let guard = DialGuard::default();
        let good = answer(&key, &[lan.clone(), lo.clone(), lo.clone()]);
        let found =
            verify_answer(&good, exit, unix_now(), AddressPolicy::Loopback, &guard).unwrap();
        assert_eq!(found.descriptor.peer_id, exit);
        assert_eq!(
            found.relays,
            vec![lo.clone()],
            "policy applied, duplicates dropped"
        );
        assert_eq!(guard.refused.get(), 1);
        let all = verify_answer(&good, exit, unix_now(), AddressPolicy::Any, &guard).unwrap();
        assert_eq!(all.relays, vec![lan.clone(), lo]);

        let replayer = Keypair::generate_ed25519().public().to_peer_id();
        assert_eq!(
            verify_answer(&good, replayer, unix_now(), AddressPolicy::Any, &guard),
            Err(ExitRefusal::NotTheProvider { signer: exit })
        );
        let only_lan = answer(&key, &[lan]);
        assert_eq!(
            verify_answer(&only_lan, exit, unix_now(), AddressPolicy::Loopback, &guard),
            Err(ExitRefusal::NoUsableRelay {
                listed: 1,
                refused: 1
            })
        );
        let none = answer(&key, &[]);
        assert!(matches!(
            verify_answer(&none, exit, unix_now(), AddressPolicy::Any, &guard),
            Err(ExitRefusal::NoUsableRelay { listed: 0, .. })
        ));
        let later = unix_now() + exit_info::MAX_AGE_SECS + 10;
        assert!(matches!(
            verify_answer(&good, exit, later, AddressPolicy::Any, &guard),
            Err(ExitRefusal::Invalid(ExitInfoError::Stale { .. }))
        ));
    }

    #[test]
    fn the_source_re_signs_when_relays_or_descriptor_change() {
        let key = Keypair::generate_ed25519();
        let (descriptor_tx, descriptor_rx) = watch::channel(None);
        let (relays_tx, relays_rx) = watch::channel(Vec::new());
        let source = exit_info_source(key.clone(), descriptor_rx, relays_rx);
        assert!(source().is_none(), "no descriptor yet: no answer");
        descriptor_tx.send_replace(Some(signed_descriptor(&key, unix_now() - 5)));
        let first = source().unwrap();
        assert_eq!(source().unwrap(), first, "unchanged: the same signature");
        assert!(first.verify(unix_now()).unwrap().relays.is_empty());
        let a = relay([127, 0, 0, 1]);
        relays_tx.send_replace(vec![a.clone()]);
        let second = source().unwrap();
        assert_eq!(
            second.verify(unix_now()).unwrap().relays,
            vec![a.to_multiaddr().to_vec()]
        );
        let newer = signed_descriptor(&key, unix_now() - 1);
        descriptor_tx.send_replace(Some(newer.clone()));
        let third = source().unwrap();
        assert_eq!(
            third.verify(unix_now()).unwrap().descriptor_bytes,
            newer.as_bytes()
        );
        // A descriptor of another identity cannot be signed for: no answer rather than a lie.
        let other = Keypair::generate_ed25519();
        descriptor_tx.send_replace(Some(signed_descriptor(&other, unix_now() - 1)));
        assert!(source().is_none());
    }
}
