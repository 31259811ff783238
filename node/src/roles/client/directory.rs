//! The client's exits and relays: one link per relay, each relay's exit list (every
//! descriptor's signature checked against the exit's own identity, so a relay cannot
//! substitute keys) fed into the [`ExitSet`], health per exit and per relay, and the route of
//! a request: the exit first, then a relay that hosts it. With pinned exits only those are
//! ever routed to.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use libp2p_identity::PeerId;
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokengo_proto::{descriptor::Descriptor, key_config::KeyConfig};

use super::{
    choice::{self, Candidate, Random as _, ThreadRandom},
    exit_set::{ExitSet, Listing, Refusal, Refused, Source, Standing, Usable},
};
use crate::{
    clock::unix_now,
    net::relay_link::{RelayLink, list_exits},
    net::transport::{RelayAddr, TransportParams},
    ops::metrics::{DescriptorRefusal, RefusalLabel},
    roles::access::ExitTokens,
    web::api_error::ApiError,
};

/// How long fetched exit lists are used before they are fetched again.
const FRESH_FOR: Duration = Duration::from_secs(60);
/// How soon lists are fetched again while an exit is held for disagreeing sources (a key
/// rotation that reached one relay before another settles within this).
const HELD_FRESH_FOR: Duration = Duration::from_secs(5);
/// How soon lists are fetched again while an exit is backing off or recently left every
/// list: a partitioned or restarted exit registers again within a second of being back, and
/// its users should see it within the next (a list fetch is one small stream per relay).
const RECOVERY_FRESH_FOR: Duration = Duration::from_secs(1);
/// How long an exit that left every list is watched for (lists fetched every
/// [`RECOVERY_FRESH_FOR`] meanwhile).
const VANISHED_WATCH: Duration = Duration::from_secs(300);
/// Most relay links a client keeps (relays named by exit records add links).
const MAX_LINKS: usize = 16;
/// First backoff after a failure; it doubles with each further failure.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// An exit to encrypt a request to.
#[derive(Debug, Clone)]
pub struct ExitInfo {
    /// Its identity.
    pub peer_id: PeerId,
    /// Its current OHTTP key (the first listed).
    pub key_config: KeyConfig,
    /// Models its backend serves (may be empty: unknown).
    pub models: Vec<String>,
}

impl ExitInfo {
    /// What a request needs of a verified descriptor; `None` if it lists no key.
    fn from_descriptor(descriptor: Descriptor) -> Option<Self> {
        Some(Self {
            peer_id: descriptor.peer_id,
            key_config: *descriptor.key_configs.first()?,
            models: descriptor.models,
        })
    }
}

/// Where one request goes: the exit, and the relay link to reach it through.
#[derive(Debug, Clone)]
pub struct Route {
    /// The exit.
    pub exit: ExitInfo,
    /// A link to a relay that hosts it.
    pub link: Arc<RelayLink>,
}

/// An exit as `/status` shows it.
#[derive(Debug, Clone)]
pub struct ExitView {
    /// The exit.
    pub exit: ExitInfo,
    /// The sources that vouch for it.
    pub vouched_by: Vec<String>,
    /// Whether its descriptor says requests must carry an access token.
    pub access_token_required: bool,
    /// Whether the client has a token to send it (its own or the default one).
    pub token_configured: bool,
}

/// How an exit or a relay has been doing.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Smoothed time to the first answer byte.
    latency: Option<Duration>,
    failures: u32,
    backoff_until: Option<Instant>,
}

impl Health {
    fn backed_off(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|until| until > now)
    }

    fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let doublings = self.failures.saturating_sub(1).min(6);
        self.backoff_until = Some(now + (BACKOFF_MIN * (1 << doublings)).min(BACKOFF_MAX));
    }

    fn succeeded(&mut self, sample: Duration) {
        self.failures = 0;
        self.backoff_until = None;
        self.latency = Some(match self.latency {
            Some(old) => (old * 7 + sample) / 8,
            None => sample,
        });
    }
}

#[derive(Debug, Default)]
struct State {
    set: ExitSet,
    exits: HashMap<PeerId, Health>,
    relays: HashMap<PeerId, Health>,
    fetched_at: Option<Instant>,
    /// What the last fetch from each relay gave: exits listed, or why it failed.
    fetches: BTreeMap<PeerId, Result<usize, String>>,
    /// The exits held after the last fetch.
    held: Vec<Refused>,
    /// Exits that were routable and are listed by no relay now, since when: their health
    /// is forgotten (an exit that comes back starts without the backoff its outage earned).
    vanished: HashMap<PeerId, Instant>,
}

/// The client's relays and the exits they (and other sources) list.
#[derive(Debug)]
pub struct Directory {
    links: Mutex<Vec<Arc<RelayLink>>>,
    params: TransportParams,
    pinned: Vec<PeerId>,
    /// Access tokens for exits that require one.
    tokens: ExitTokens,
    state: Mutex<State>,
    refreshing: tokio::sync::Mutex<()>,
    refused: Family<RefusalLabel, Counter>,
}

impl Directory {
    /// A directory over `relays` (not dialled yet), routing only to `pinned` exits when that
    /// is not empty; `tokens` are sent to exits that require one (unpinned, an exit that
    /// requires a token the client lacks is skipped); refused descriptors are counted in
    /// `refused`.
    pub fn new(
        relays: &[RelayAddr],
        pinned: Vec<PeerId>,
        tokens: ExitTokens,
        params: TransportParams,
        refused: Family<RefusalLabel, Counter>,
    ) -> std::io::Result<Self> {
        if relays.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no relay to connect to",
            ));
        }
        let mut links = Vec::with_capacity(relays.len());
        for relay in relays {
            if !links
                .iter()
                .any(|l: &Arc<RelayLink>| l.relay().peer_id() == relay.peer_id())
            {
                links.push(Arc::new(RelayLink::new(relay.clone(), params)?));
            }
        }
        Ok(Self {
            links: Mutex::new(links),
            params,
            pinned,
            tokens,
            state: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
            refused,
        })
    }

    /// The exits requests may go to, when the user pinned some (empty: any).
    #[must_use]
    pub fn pinned(&self) -> &[PeerId] {
        &self.pinned
    }

    /// The access tokens to send.
    #[must_use]
    pub fn tokens(&self) -> &ExitTokens {
        &self.tokens
    }

    /// The relay links, in the order the relays were given.
    #[must_use]
    pub fn links(&self) -> Vec<Arc<RelayLink>> {
        self.lock_links().clone()
    }

    /// Fetches every relay's exit list now (one refresh at a time; a caller that waited for
    /// another's refresh uses its result). Returns the number of exits requests may go to;
    /// an error only when no relay answered.
    pub async fn refresh(&self) -> Result<usize, ApiError> {
        let before = self.lock().fetched_at;
        let _turn = self.refreshing.lock().await;
        if self.lock().fetched_at == before {
            self.fetch_all().await;
        }
        let state = self.lock();
        let answered = state.fetches.values().any(Result::is_ok);
        if !answered && let Some(Err(error)) = state.fetches.values().next() {
            return Err(ApiError::RelayUnreachable(error.clone()));
        }
        Ok(self.routable(&state).len())
    }

    /// Makes sure the lists were fetched after `since` (fetching them now unless another
    /// caller's fetch began after it), then returns a route to `exit` itself if it is still
    /// usable: what a request does after the exit answered "key unknown", to retry that exit
    /// with its fresh descriptor before trying any other. `None` when the exit is no longer
    /// usable or no relay that lists it is reachable.
    pub async fn route_to(&self, exit: PeerId, since: Instant) -> Option<Route> {
        {
            let _turn = self.refreshing.lock().await;
            if self.lock().fetched_at.is_none_or(|at| at < since) {
                self.fetch_all().await;
            }
        }
        let (usable, relay) = {
            let state = self.lock();
            let usable = self
                .routable(&state)
                .into_iter()
                .find(|u| u.descriptor.peer_id == exit)?;
            let relay = pick_relay(&usable.relays, &state.relays, Instant::now())?;
            (usable, relay)
        };
        let link = self.link_for(&relay)?;
        Some(Route {
            exit: ExitInfo::from_descriptor(usable.descriptor)?,
            link,
        })
    }

    async fn fetch_all(&self) {
        // The lists are as of when the fetch began (what `route_to` relies on).
        let began = Instant::now();
        let links = self.links();
        let fetched = futures_util::future::join_all(
            links
                .iter()
                .map(|link| async move { (link.relay().clone(), list_exits(link).await) }),
        )
        .await;
        let now = unix_now();
        let mut state = self.lock();
        for (relay, outcome) in fetched {
            let listings = match &outcome {
                Ok(descriptors) => descriptors
                    .iter()
                    .map(|descriptor| Listing {
                        descriptor: descriptor.clone(),
                        relays: vec![relay.clone()],
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            state.set.observe(&Source::Relay(relay.peer_id()), listings);
            state.fetches.insert(
                relay.peer_id(),
                outcome.map(|d| d.len()).map_err(|e| e.to_string()),
            );
        }
        state.set.expire(now);
        state.fetched_at = Some(began);
        self.track_vanished(&mut state, began);
        let held = state.set.held();
        // Counted and logged when an exit becomes held, not at every refresh while it is.
        let new: Vec<Refused> = held
            .iter()
            .filter(|r| !state.held.contains(r))
            .cloned()
            .collect();
        state.held = held;
        drop(state);
        self.count_refused(&new);
    }

    /// Forgets the health of exits no list holds any more (and remembers them for a while,
    /// so lists are fetched often until they come back).
    fn track_vanished(&self, state: &mut State, now: Instant) {
        let listed: HashSet<PeerId> = self
            .routable(state)
            .into_iter()
            .map(|u| u.descriptor.peer_id)
            .collect();
        let gone: Vec<PeerId> = state
            .exits
            .keys()
            .filter(|id| !listed.contains(id))
            .copied()
            .collect();
        for id in gone {
            state.exits.remove(&id);
            state.vanished.insert(id, now);
        }
        state.vanished.retain(|id, since| {
            !listed.contains(id) && now.duration_since(*since) < VANISHED_WATCH
        });
    }

    fn count_refused(&self, refused: &[Refused]) {
        for Refused {
            exit,
            source,
            reason,
        } in refused
        {
            tracing::warn!(
                %exit,
                %source,
                reason = reason.as_str(),
                "{source} serves a descriptor for this exit whose keys differ from the newest seen; the exit is not used until all sources agree"
            );
            self.refused
                .get_or_create(&RefusalLabel {
                    reason: match reason {
                        Refusal::Rollback => DescriptorRefusal::Rollback,
                        Refusal::KeyConflict => DescriptorRefusal::KeyConflict,
                    },
                })
                .inc();
        }
    }

    /// Takes the exits a DHT lookup found as the DHT's claims (replacing the previous
    /// lookup's). The DHT vouches, never hosts: the relays an exit names get links (up to a
    /// bound), and a request goes through one of them only once its own list shows the exit.
    /// The lists are fetched again at the next request.
    pub fn learn_from_dht(&self, found: Vec<(Descriptor, Vec<RelayAddr>)>) {
        let mut listings = Vec::with_capacity(found.len());
        for (descriptor, relays) in found {
            for relay in &relays {
                if self.link_for(relay).is_none() {
                    tracing::debug!(%relay, "relay named by a DHT exit record not linked: too many relays");
                }
            }
            if !descriptor.key_configs.is_empty() {
                listings.push(Listing {
                    descriptor,
                    relays: Vec::new(),
                });
            }
        }
        let mut state = self.lock();
        state.set.observe(&Source::Dht, listings);
        state.fetched_at = None;
    }

    /// Whether the lists are older than their freshness (shorter while an exit is held, and
    /// shorter still while one is backing off or recently left every list).
    fn stale(&self) -> bool {
        let state = self.lock();
        let now = Instant::now();
        let recovering =
            !state.vanished.is_empty() || state.exits.values().any(|health| health.backed_off(now));
        let fresh_for = if recovering {
            RECOVERY_FRESH_FOR
        } else if state.held.is_empty() {
            FRESH_FOR
        } else {
            HELD_FRESH_FOR
        };
        state.fetched_at.is_none_or(|at| at.elapsed() >= fresh_for)
    }

    /// The route for a request for `model`, avoiding the exits in `exclude` (tried already).
    /// Lists are fetched first when stale or when `refresh` is set, and once more when
    /// nothing is routable. With pinned exits the error names them and what was tried, also
    /// when no relay answered; otherwise that is a relay error, and no exit a 503.
    pub async fn route(
        &self,
        model: Option<&str>,
        exclude: &[PeerId],
        refresh: bool,
    ) -> Result<Route, ApiError> {
        let mut refreshed = false;
        let mut failure = None;
        if refresh || self.stale() {
            refreshed = true;
            failure = self.refresh().await.err();
        }
        if let Some(route) = self.pick(model, exclude) {
            return Ok(route);
        }
        if !refreshed {
            failure = self.refresh().await.err();
            if let Some(route) = self.pick(model, exclude) {
                return Ok(route);
            }
        }
        match failure {
            Some(error) if self.pinned.is_empty() => Err(error),
            _ => Err(self.unavailable(exclude)),
        }
    }

    /// The exits requests may go to now: usable, pinned when pinning, reachable through a
    /// relay. Unpinned, an exit that requires an access token the client lacks is skipped
    /// (its requests would only fail); a pinned one is kept, so its 401 tells the user what
    /// is missing.
    fn routable(&self, state: &State) -> Vec<Usable> {
        state
            .set
            .usable()
            .into_iter()
            .filter(|u| {
                let d = &u.descriptor;
                if self.pinned.is_empty() {
                    !d.access_token_required || self.tokens.for_exit(&d.peer_id).is_some()
                } else {
                    self.pinned.contains(&d.peer_id)
                }
            })
            .filter(|u| !u.relays.is_empty() && !u.descriptor.key_configs.is_empty())
            .collect()
    }

    fn pick(&self, model: Option<&str>, exclude: &[PeerId]) -> Option<Route> {
        let (usable, relay) = {
            let state = self.lock();
            let now = Instant::now();
            let routable: Vec<Usable> = self
                .routable(&state)
                .into_iter()
                .filter(|u| !exclude.contains(&u.descriptor.peer_id))
                .collect();
            let candidates: Vec<Candidate<usize>> = routable
                .iter()
                .enumerate()
                .map(|(index, usable)| {
                    let d = &usable.descriptor;
                    let health = state.exits.get(&d.peer_id);
                    Candidate {
                        id: index,
                        // A pinned exit is trusted by the user, not by the number of sources.
                        corroborated: !self.pinned.is_empty() || usable.corroborated(),
                        serves_model: match model {
                            Some(m) if !d.models.is_empty() => d.models.iter().any(|x| x == m),
                            _ => true,
                        },
                        backed_off: health.is_some_and(|h| h.backed_off(now)),
                        latency: health.and_then(|h| h.latency),
                    }
                })
                .collect();
            let index = choice::choose(&candidates, &mut ThreadRandom)?;
            let usable = routable.into_iter().nth(index)?;
            let relay = pick_relay(&usable.relays, &state.relays, now)?;
            (usable, relay)
        };
        let link = self.link_for(&relay)?;
        Some(Route {
            exit: ExitInfo::from_descriptor(usable.descriptor)?,
            link,
        })
    }

    /// The link to `relay`, made if there is none yet (and there is room).
    fn link_for(&self, relay: &RelayAddr) -> Option<Arc<RelayLink>> {
        let mut links = self.lock_links();
        if let Some(link) = links
            .iter()
            .find(|l| l.relay().peer_id() == relay.peer_id())
        {
            return Some(Arc::clone(link));
        }
        if links.len() >= MAX_LINKS {
            return None;
        }
        let link = Arc::new(RelayLink::new(relay.clone(), self.params).ok()?);
        links.push(Arc::clone(&link));
        Some(link)
    }

    /// The error when nothing is routable: with pinned exits, which they are and why each is
    /// out, and what every relay answered.
    fn unavailable(&self, tried: &[PeerId]) -> ApiError {
        if self.pinned.is_empty() {
            return ApiError::NoExit;
        }
        let state = self.lock();
        let now = Instant::now();
        let pinned: Vec<String> = self.pinned.iter().map(ToString::to_string).collect();
        let mut reasons: Vec<String> = self
            .pinned
            .iter()
            .map(|exit| {
                let why = match state.set.standing(exit) {
                    None => "not listed by any relay".to_owned(),
                    Some(Standing::Unlisted) => "no longer listed by any relay".to_owned(),
                    Some(Standing::Held(refused)) => format!(
                        "held: {} serves other keys for it than the newest seen",
                        refused.source
                    ),
                    Some(Standing::Usable(_)) if tried.contains(exit) => {
                        "listed, but failed for this request".to_owned()
                    }
                    Some(Standing::Usable(_)) => match state.exits.get(exit) {
                        Some(health) if health.backed_off(now) => {
                            "backing off after failures".to_owned()
                        }
                        _ => "no relay that lists it is reachable".to_owned(),
                    },
                };
                format!("{exit}: {why}")
            })
            .collect();
        let relays: Vec<String> = state
            .fetches
            .iter()
            .map(|(relay, outcome)| match outcome {
                Ok(n) => format!("relay {relay} listed {n} exits"),
                Err(error) => format!("relay {relay} unreachable ({error})"),
            })
            .collect();
        reasons.extend(relays);
        ApiError::PinnedExitsUnavailable {
            pinned: pinned.join(", "),
            tried: reasons.join("; "),
        }
    }

    /// Records how long an exit and its relay took to start answering; clears their backoff.
    pub fn succeeded(&self, route: &Route, sample: Duration) {
        let mut state = self.lock();
        state
            .exits
            .entry(route.exit.peer_id)
            .or_default()
            .succeeded(sample);
        state
            .relays
            .entry(route.link.relay().peer_id())
            .or_default()
            .succeeded(sample);
    }

    /// Backs off from an exit that failed without the request reaching it.
    pub fn exit_failed(&self, exit: PeerId) {
        self.lock()
            .exits
            .entry(exit)
            .or_default()
            .failed(Instant::now());
    }

    /// Backs off from a relay that could not be reached.
    pub fn relay_failed(&self, relay: PeerId) {
        self.lock()
            .relays
            .entry(relay)
            .or_default()
            .failed(Instant::now());
    }

    /// The exits requests may go to, as of the last fetch.
    #[must_use]
    pub fn current(&self) -> Vec<ExitView> {
        let state = self.lock();
        self.routable(&state)
            .into_iter()
            .filter_map(|usable| {
                let peer_id = usable.descriptor.peer_id;
                Some(ExitView {
                    vouched_by: usable.vouched_by.iter().map(ToString::to_string).collect(),
                    access_token_required: usable.descriptor.access_token_required,
                    token_configured: self.tokens.for_exit(&peer_id).is_some(),
                    exit: ExitInfo::from_descriptor(usable.descriptor)?,
                })
            })
            .collect()
    }

    /// Whether every relay failed: its last exit list could not be fetched, or it is backing
    /// off after a request could not reach it. A discovering client then looks for relays
    /// again.
    #[must_use]
    pub fn relays_down(&self) -> bool {
        let links = self.links();
        let state = self.lock();
        let now = Instant::now();
        !links.is_empty()
            && links.iter().all(|link| {
                let peer = link.relay().peer_id();
                matches!(state.fetches.get(&peer), Some(Err(_)))
                    || state.relays.get(&peer).is_some_and(|h| h.backed_off(now))
            })
    }

    /// Replaces the relays with `relays` (links to relays kept are reused; the lists are
    /// fetched again at the next request). Nothing changes when `relays` is empty.
    pub fn replace_relays(&self, relays: &[RelayAddr]) {
        if relays.is_empty() {
            return;
        }
        let mut links = self.lock_links();
        let mut next: Vec<Arc<RelayLink>> = Vec::with_capacity(relays.len());
        for relay in relays.iter().take(MAX_LINKS) {
            if next.iter().any(|l| l.relay().peer_id() == relay.peer_id()) {
                continue;
            }
            let kept = links
                .iter()
                .find(|l| l.relay().peer_id() == relay.peer_id())
                .cloned();
            match kept {
                Some(link) => next.push(link),
                None => match RelayLink::new(relay.clone(), self.params) {
                    Ok(link) => next.push(Arc::new(link)),
                    Err(error) => tracing::warn!(%relay, %error, "cannot make a relay link"),
                },
            }
        }
        if next.is_empty() {
            return;
        }
        *links = next;
        drop(links);
        let mut state = self.lock();
        state.fetches.clear();
        state.fetched_at = None;
    }

    /// Exits held back because their sources disagree, as `PEERID: reason`.
    #[must_use]
    pub fn held(&self) -> Vec<String> {
        self.lock()
            .set
            .held()
            .into_iter()
            .map(|r| format!("{}: {} ({})", r.exit, r.source, r.reason.as_str()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single assignment or insert: a panic elsewhere cannot leave the
        // state half-changed, so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, Vec<Arc<RelayLink>>> {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A relay among `hosting` for one request: at random among those not backing off (all of
/// them when every one is), so no relay can count on getting an exit's traffic.
fn pick_relay(
    hosting: &[RelayAddr],
    health: &HashMap<PeerId, Health>,
    now: Instant,
) -> Option<RelayAddr> {
    let healthy: Vec<&RelayAddr> = hosting
        .iter()
        .filter(|r| !health.get(&r.peer_id()).is_some_and(|h| h.backed_off(now)))
        .collect();
    let pool: Vec<&RelayAddr> = if healthy.is_empty() {
        hosting.iter().collect()
    } else {
        healthy
    };
    if pool.is_empty() {
        return None;
    }
    Some(pool[ThreadRandom.below(pool.len())].clone())
}

impl Refusal {
    /// The log's word for it.
    fn as_str(self) -> &'static str {
        match self {
            Self::Rollback => "rollback",
            Self::KeyConflict => "key_conflict",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_cap_and_success_clears_it() {
        let now = Instant::now();
        let mut health = Health::default();
        health.failed(now);
        assert_eq!(health.backoff_until, Some(now + BACKOFF_MIN));
        health.failed(now);
        assert_eq!(health.backoff_until, Some(now + BACKOFF_MIN * 2));
        for _ in 0..20 {
            health.failed(now);
        }
        assert_eq!(health.backoff_until, Some(now + BACKOFF_MAX));
        assert!(health.backed_off(now));
        health.succeeded(Duration::from_millis(8));
        assert!(!health.backed_off(now));
        health.succeeded(Duration::from_millis(16));
        assert_eq!(health.latency, Some(Duration::from_millis(9)));
    }

    #[test]
    fn relays_backing_off_are_avoided_unless_all_are() {
        let relay = |n: u16| {
            RelayAddr::new(
                ([127, 0, 0, 1], n).into(),
                libp2p_identity::Keypair::generate_ed25519()
                    .public()
                    .to_peer_id(),
            )
        };
        let (a, b) = (relay(1), relay(2));
        let now = Instant::now();
        let mut health = HashMap::new();
        health
            .entry(a.peer_id())
            .or_insert_with(Health::default)
            .failed(now);
        for _ in 0..50 {
            assert_eq!(
                pick_relay(&[a.clone(), b.clone()], &health, now),
                Some(b.clone())
            );
        }
        assert_eq!(pick_relay(std::slice::from_ref(&a), &health, now), Some(a));
        assert_eq!(pick_relay(&[], &health, now), None);
    }
}
