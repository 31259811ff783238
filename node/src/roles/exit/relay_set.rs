//! The relays an exit keeps registered with: one tunnel task per [`Member`], each reconnecting
//! on its own with backoff; the exit is registered while any tunnel is.
//!
//! A relay given by IP is one tunnel. A relay given by DNS name (`/dns4/NAME/...`: in
//! Kubernetes a headless Service, one A record per ready relay pod, every pod one identity)
//! is one tunnel per address the name resolves to, each proving the same PeerId: the name is
//! resolved again every `RELAY_RESOLVE_INTERVAL` (10 s, `config::defaults`) and at once when
//! one of its tunnels is lost; new addresses get a tunnel, and the tunnel of an address no
//! longer resolved is retired (closed once its requests are done). A failed resolution is
//! logged and changes nothing. A discovering exit also replaces relays it lost, so it keeps
//! `max_relays` registrations.
//!
//! [`Supervisor`] holds the state and has one method per event; its loop only dispatches.
//! What to start and retire is decided by the pure functions of [`members`].

mod members;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use self::members::{Member, admits, plan};
use super::{
    Exit, RegisteredHook,
    tunnel::{Ended, Stop, TunnelError},
};
use crate::{
    config::defaults::{
        LOST_RELAY_AFTER as LOST_AFTER, MAX_RELAY_NAME_ADDRESSES as MAX_NAME_ADDRESSES,
        REDISCOVER_MAX, REDISCOVER_MIN,
    },
    net::discovery::{self, DhtConfig, Seek},
    net::resolve::ResolveError,
    net::transport::RelayAddr,
    ops::status::ExitRelayStatus,
};

/// Where a discovering exit finds replacements for relays it lost.
#[derive(Debug, Clone)]
pub struct Replenish {
    /// The DHT to look relays up on.
    pub dht: DhtConfig,
    /// What a discovery looks for (its cache is refreshed with what verified).
    pub seek: Seek,
    /// Relays used when the DHT and the cache yield none.
    pub fallback: Vec<RelayAddr>,
    /// Relays to keep registered with (`max_relays`).
    pub want: usize,
}

/// One running tunnel as the readers of the exit's state see it.
#[derive(Debug, Clone)]
struct Tunnel {
    member: Member,
    registered: bool,
}

/// Every tunnel the exit keeps, with whether it is registered.
type Tunnels = Arc<Mutex<Vec<Tunnel>>>;

/// What one tunnel task reports when it ends.
type TunnelEnd = (Member, Result<Ended, TunnelError>);

/// What one resolution of a name (by its index) gave.
type Resolved = (usize, Result<Vec<SocketAddr>, ResolveError>);

impl Exit {
    /// Keeps a registered tunnel to `relay` until shutdown (one per address, for a relay
    /// given by DNS name). `registered` turns true on every successful registration and
    /// false while disconnected. Fails only on errors that retrying cannot fix (the relay is
    /// not who its address says, the relay refuses us).
    pub async fn run(
        self,
        relay: RelayAddr,
        registered: watch::Sender<bool>,
        shutdown: CancellationToken,
    ) -> Result<(), TunnelError> {
        self.run_many(vec![relay], registered, None, shutdown).await
    }

    /// Keeps a registered tunnel to each of `relays` until shutdown, each reconnecting with
    /// its own backoff (a relay given by DNS name: to each address it resolves to).
    /// `registered` is true while at least one tunnel is registered; `hook` is called at each
    /// tunnel's first registration. Fails when every relay given by IP failed with an error
    /// retrying cannot fix and no name is left to resolve.
    pub async fn run_many(
        self,
        relays: Vec<RelayAddr>,
        registered: watch::Sender<bool>,
        hook: Option<RegisteredHook>,
        shutdown: CancellationToken,
    ) -> Result<(), TunnelError> {
        self.run_set(relays, None, registered, hook, shutdown).await
    }

    /// [`Exit::run_many`] for relays that were discovered: a relay unreachable for
    /// [`LOST_AFTER`] is dropped, and discovery runs again (with backoff) whenever fewer
    /// than `replenish.want` relays are held.
    pub async fn run_discovering(
        self,
        relays: Vec<RelayAddr>,
        replenish: Replenish,
        registered: watch::Sender<bool>,
        hook: Option<RegisteredHook>,
        shutdown: CancellationToken,
    ) -> Result<(), TunnelError> {
        self.run_set(relays, Some(replenish), registered, hook, shutdown)
            .await
    }

    async fn run_set(
        self,
        relays: Vec<RelayAddr>,
        replenish: Option<Replenish>,
        registered: watch::Sender<bool>,
        hook: Option<RegisteredHook>,
        shutdown: CancellationToken,
    ) -> Result<(), TunnelError> {
        // Requests dated in the second the exit started are refused (a previous run may have
        // seen them): registering only after it keeps honest clients from meeting that.
        self.gateway.wait_until_accepting().await;
        let models = self.gateway.backend().models().await;
        tracing::info!(
            models = models.len(),
            relays = relays.len(),
            "backend models discovered"
        );
        let endpoints: Vec<_> = self
            .gateway
            .backend()
            .policy()
            .rules()
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(?endpoints, "endpoints passed to the backend");
        let exit = Arc::new(self);
        let key_stop = shutdown.child_token();
        let key_upkeep = exit.spawn_key_upkeep(key_stop.clone());
        let (lost_tx, lost) = mpsc::unbounded_channel();
        let names: Vec<RelayAddr> = relays
            .iter()
            .filter(|r| r.name().is_some())
            .cloned()
            .collect();
        let set = RelaySet {
            names: names.into(),
            exit: Arc::clone(&exit),
            models: Arc::new(models),
            tunnels: Arc::new(Mutex::new(Vec::new())),
            registered: Arc::new(registered),
            hook,
            give_up: replenish.as_ref().map(|_| LOST_AFTER),
            shutdown: shutdown.clone(),
            lost: lost_tx,
        };
        let result = Supervisor::new(set, relays, replenish, lost).run().await;
        key_stop.cancel();
        if let Some(task) = key_upkeep {
            let _ = task.await;
        }
        result
    }
}

/// What every tunnel of one exit shares, and how their state is published.
struct RelaySet {
    exit: Arc<Exit>,
    /// The relays given by DNS name: listed in the status label even while they resolve to
    /// nothing.
    names: Arc<[RelayAddr]>,
    models: Arc<Vec<String>>,
    tunnels: Tunnels,
    registered: Arc<watch::Sender<bool>>,
    hook: Option<RegisteredHook>,
    /// Set for discovered relays: how long one may stay unreachable.
    give_up: Option<Duration>,
    shutdown: CancellationToken,
    /// Where a tunnel that lost its registration says so (a name is then resolved again).
    lost: mpsc::UnboundedSender<Member>,
}

/// A relay given by DNS name, and where its resolution stands.
#[derive(Debug)]
struct Name {
    relay: RelayAddr,
    /// A resolution of it is running.
    resolving: bool,
    /// Addresses whose tunnel failed for good (not the relay it names, or refused): not
    /// dialled again while the name keeps resolving to them.
    refused: Vec<SocketAddr>,
}

/// Whether the supervisor goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// The running relay set: its tunnels, the names it resolves and the discovery that refills
/// it. One method per event; [`Supervisor::run`] dispatches.
struct Supervisor {
    set: RelaySet,
    running: JoinSet<TunnelEnd>,
    /// Each running tunnel's retirement token.
    retire: Vec<(Member, CancellationToken)>,
    names: Vec<Name>,
    resolving: JoinSet<Resolved>,
    next_resolve: Instant,
    lost: mpsc::UnboundedReceiver<Member>,
    replenish: Option<Replenish>,
    discovery: Option<JoinHandle<Vec<RelayAddr>>>,
    rediscover_wait: Duration,
    next_discovery: Instant,
    /// Fatal errors of relays given by IP or discovered.
    errors: Vec<TunnelError>,
}

impl Supervisor {
    fn new(
        set: RelaySet,
        relays: Vec<RelayAddr>,
        replenish: Option<Replenish>,
        lost: mpsc::UnboundedReceiver<Member>,
    ) -> Self {
        let mut supervisor = Self {
            set,
            running: JoinSet::new(),
            retire: Vec::new(),
            names: Vec::new(),
            resolving: JoinSet::new(),
            // Names are resolved at once.
            next_resolve: Instant::now(),
            lost,
            replenish,
            discovery: None,
            rediscover_wait: REDISCOVER_MIN,
            next_discovery: Instant::now() + REDISCOVER_MIN,
            errors: Vec::new(),
        };
        for relay in relays {
            if relay.name().is_some() {
                if !supervisor.names.iter().any(|n| n.relay == relay) {
                    supervisor.names.push(Name {
                        relay,
                        resolving: false,
                        refused: Vec::new(),
                    });
                }
            } else {
                supervisor.start(Member::direct(relay));
            }
        }
        supervisor
    }

    /// Runs the tunnels until shutdown (or until every fixed relay failed for good and no
    /// name is left to resolve).
    async fn run(mut self) -> Result<(), TunnelError> {
        let shutdown = self.set.shutdown.clone();
        loop {
            let short = self.short();
            let flow = tokio::select! {
                () = shutdown.cancelled() => Flow::Stop,
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    match done {
                        Ok(end) => self.tunnel_ended(end),
                        Err(_) => Flow::Continue,
                    }
                }
                () = tokio::time::sleep_until(self.next_resolve), if !self.names.is_empty() => {
                    self.resolve_every_name();
                    Flow::Continue
                }
                Some(done) = self.resolving.join_next(), if !self.resolving.is_empty() => {
                    if let Ok(resolved) = done {
                        self.resolved(resolved);
                    }
                    Flow::Continue
                }
                Some(member) = self.lost.recv() => {
                    self.member_lost(&member);
                    Flow::Continue
                }
                () = tokio::time::sleep_until(self.next_discovery), if short && self.discovery.is_none() => {
                    self.discover();
                    Flow::Continue
                }
                found = finished(&mut self.discovery), if self.discovery.is_some() => {
                    self.discovered(found);
                    Flow::Continue
                }
            };
            if flow == Flow::Stop {
                break;
            }
        }
        self.finish().await
    }

    /// Starts the tunnel of `member` unless one already runs that it would duplicate
    /// ([`admits`]).
    fn start(&mut self, member: Member) {
        {
            let mut tunnels = self.set.lock();
            let held: Vec<&Member> = tunnels.iter().map(|t| &t.member).collect();
            if !admits(&held, &member) {
                return;
            }
            tunnels.push(Tunnel {
                member: member.clone(),
                registered: false,
            });
        }
        self.set.publish();
        let (tx, rx) = watch::channel(false);
        self.set.follow(member.clone(), rx);
        let stop = Stop {
            shutdown: self.set.shutdown.clone(),
            retire: CancellationToken::new(),
        };
        self.retire.push((member.clone(), stop.retire.clone()));
        let exit = Arc::clone(&self.set.exit);
        let models = Arc::clone(&self.set.models);
        let give_up = self.set.give_up;
        self.running.spawn(async move {
            let outcome = exit
                .run_one(&member.dial, &models, tx, give_up, &stop)
                .await;
            (member, outcome)
        });
    }

    /// Retires the tunnel of `member` (its address is no longer resolved). It leaves the set
    /// when its task ends.
    fn retire(&self, member: &Member) {
        if let Some((_, token)) = self.retire.iter().find(|(m, _)| m == member) {
            token.cancel();
        }
    }

    /// A tunnel task ended: the member leaves the set; a discovered relay that gave up is
    /// replaced, a name whose member ended is resolved again at once.
    fn tunnel_ended(&mut self, (member, outcome): TunnelEnd) -> Flow {
        self.set.forget(&member);
        self.retire.retain(|(m, _)| *m != member);
        let name = self.name_of(&member);
        match outcome {
            Ok(Ended::Shutdown | Ended::Retired) => {}
            Ok(Ended::GaveUp) => {
                self.rediscover_wait = REDISCOVER_MIN;
                self.next_discovery = Instant::now();
            }
            Err(error) => match (name, member.resolved()) {
                (Some(index), Some(at)) => {
                    tracing::warn!(relay = %member.given, %at, "{error:#}; this address is not dialled again while the name resolves to it");
                    self.names[index].refused.push(at);
                }
                _ => {
                    tracing::warn!(relay = %member.dial, "{error:#}");
                    self.errors.push(error);
                }
            },
        }
        if let Some(index) = name {
            self.resolve(index);
        }
        if self.running.is_empty() && self.replenish.is_none() && self.names.is_empty() {
            // Every fixed relay failed for good: nothing left to serve through.
            return Flow::Stop;
        }
        Flow::Continue
    }

    /// A tunnel lost its registration: its name (if it has one) is resolved again at once,
    /// so a relay pod that left DNS is not redialled for long.
    fn member_lost(&mut self, member: &Member) {
        if let Some(index) = self.name_of(member) {
            self.resolve(index);
        }
    }

    /// The periodic resolution of every name.
    fn resolve_every_name(&mut self) {
        for index in 0..self.names.len() {
            self.resolve(index);
        }
        self.next_resolve = Instant::now() + self.set.exit.resolve_every;
    }

    /// Resolves name `index` unless a resolution of it is running.
    fn resolve(&mut self, index: usize) {
        if self.set.shutdown.is_cancelled() {
            return;
        }
        let Some(name) = self.names.get_mut(index) else {
            return;
        };
        if name.resolving {
            return;
        }
        name.resolving = true;
        let relay = name.relay.clone();
        let resolver = Arc::clone(&self.set.exit.resolver);
        self.resolving
            .spawn(async move { (index, relay.resolve_all(&*resolver).await) });
    }

    /// A name resolved: its tunnels are made to match (start the new addresses, retire the
    /// vanished ones). A failure keeps every tunnel and is retried at the next resolution.
    fn resolved(&mut self, (index, outcome): Resolved) {
        let Some(name) = self.names.get_mut(index) else {
            return;
        };
        name.resolving = false;
        let relay = name.relay.clone();
        let held: Vec<Member> = self
            .retire
            .iter()
            .filter(|(m, token)| m.of(&relay) && !token.is_cancelled())
            .map(|(m, _)| m.clone())
            .collect();
        let addrs = match outcome {
            Ok(addrs) => addrs,
            Err(error) => {
                tracing::warn!(
                    %relay,
                    tunnels = held.len(),
                    retry_in = ?self.set.exit.resolve_every,
                    "{error}; keeping the tunnels it has and resolving it again then (check the name, and that a headless Service lists ready relay pods)"
                );
                return;
            }
        };
        name.refused.retain(|at| addrs.contains(at));
        if addrs.len() > MAX_NAME_ADDRESSES {
            tracing::warn!(%relay, resolved = addrs.len(), kept = MAX_NAME_ADDRESSES, "relay name resolves to more addresses than the exit keeps tunnels to; using the first");
        }
        let wanted: Vec<SocketAddr> = addrs
            .iter()
            .take(MAX_NAME_ADDRESSES)
            .filter(|at| !name.refused.contains(at))
            .copied()
            .collect();
        let dialled: Vec<SocketAddr> = held.iter().filter_map(Member::resolved).collect();
        let plan = plan(&dialled, &wanted);
        if plan.is_empty() {
            return;
        }
        tracing::info!(%relay, resolved = ?addrs, start = ?plan.start, retire = ?plan.retire, "relay name resolved to other addresses");
        for at in plan.retire {
            if let Some(member) = held.iter().find(|m| m.resolved() == Some(at)) {
                self.retire(member);
            }
        }
        for at in plan.start {
            self.start(Member::of_name(&relay, at));
        }
    }

    /// The index of the name `member` belongs to.
    fn name_of(&self, member: &Member) -> Option<usize> {
        self.names.iter().position(|n| member.of(&n.relay))
    }

    /// Whether a discovering exit holds fewer relays than it wants.
    fn short(&self) -> bool {
        self.replenish
            .as_ref()
            .is_some_and(|r| self.set.held().len() < r.want)
    }

    /// Runs a discovery (its cache is rewritten with what verified); its relays, or the
    /// fallback relays when it found none, arrive in [`Supervisor::discovered`].
    fn discover(&mut self) {
        let Some(replenish) = &self.replenish else {
            return;
        };
        let dht = replenish.dht.clone();
        let mut seek = replenish.seek.clone();
        let held = self.set.held().len();
        // Relays already held verify too: ask for enough to replace the missing ones.
        seek.want = replenish.want.saturating_add(held);
        let fallback = replenish.fallback.clone();
        let shutdown = self.set.shutdown.child_token();
        tracing::info!(
            held,
            want = replenish.want,
            "fewer relays than wanted; discovering"
        );
        self.discovery = Some(tokio::spawn(async move {
            let found = discovery::discover(&dht, seek, &shutdown).await;
            match discovery::or_fallback(found, &fallback) {
                Ok(relays) => relays,
                Err(error) => {
                    tracing::warn!(%error, "no relay found; trying again later");
                    Vec::new()
                }
            }
        }));
    }

    /// A discovery ended: relays not held yet (by PeerId) get tunnels, up to the number
    /// wanted; the next discovery waits longer while still short.
    fn discovered(&mut self, found: Vec<RelayAddr>) {
        self.discovery = None;
        let want = self.replenish.as_ref().map_or(0, |r| r.want);
        let held = self.set.held();
        for relay in found
            .into_iter()
            .filter(|r| !held.iter().any(|h| h.dial.peer_id() == r.peer_id()))
            .take(want.saturating_sub(held.len()))
        {
            tracing::info!(%relay, "registering with a newly discovered relay");
            self.start(Member::direct(relay));
        }
        self.rediscover_wait = if self.set.held().len() < want {
            (self.rediscover_wait * 2).min(REDISCOVER_MAX)
        } else {
            REDISCOVER_MIN
        };
        self.next_discovery = Instant::now() + self.rediscover_wait;
    }

    /// Waits for every tunnel to end and reports the fixed relays' fatal error, if that is
    /// why the set stopped.
    async fn finish(mut self) -> Result<(), TunnelError> {
        if let Some(task) = self.discovery.take() {
            task.abort();
        }
        self.resolving.abort_all();
        while let Some(done) = self.running.join_next().await {
            if let Ok((member, Err(error))) = done {
                tracing::warn!(relay = %member.dial, "{error}");
                if member.resolved().is_none() {
                    self.errors.push(error);
                }
            }
        }
        self.set.registered.send_replace(false);
        self.set.exit.metrics.relay_connected.set(0);
        match self.errors.into_iter().next() {
            // Every fixed relay refused the exit for good: nothing left to serve through.
            Some(error) if self.replenish.is_none() && !self.set.shutdown.is_cancelled() => {
                Err(error)
            }
            _ => Ok(()),
        }
    }
}

impl RelaySet {
    /// Folds one tunnel's registration state into the exit's: registered while any tunnel
    /// is; the hook runs at the tunnel's first registration; a lost registration is reported
    /// to the supervisor.
    fn follow(&self, member: Member, mut rx: watch::Receiver<bool>) {
        let tunnels = Arc::clone(&self.tunnels);
        let state = self.publisher();
        let hook = self.hook.clone();
        let lost = self.lost.clone();
        tokio::spawn(async move {
            let mut announced = false;
            let mut was = false;
            while rx.changed().await.is_ok() {
                let now = *rx.borrow_and_update();
                if let Some(entry) = tunnels
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter_mut()
                    .find(|t| t.member == member)
                {
                    entry.registered = now;
                }
                state.publish();
                if was && !now {
                    // The supervisor may have stopped (shutdown): nobody to tell then.
                    let _ = lost.send(member.clone());
                }
                was = now;
                if now
                    && !announced
                    && let Some(hook) = &hook
                {
                    announced = true;
                    hook(&member.dial);
                }
            }
        });
    }

    /// Drops `member` from the set (its task ended).
    fn forget(&self, member: &Member) {
        self.lock().retain(|t| t.member != *member);
        self.publish();
    }

    /// The members held now.
    fn held(&self) -> Vec<Member> {
        self.lock().iter().map(|t| t.member.clone()).collect()
    }

    fn publisher(&self) -> Publisher {
        Publisher {
            exit: Arc::clone(&self.exit),
            names: Arc::clone(&self.names),
            tunnels: Arc::clone(&self.tunnels),
            registered: Arc::clone(&self.registered),
        }
    }

    fn publish(&self) {
        self.publisher().publish();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Tunnel>> {
        // Each update is one push, retain or flag: a poisoned lock still holds a whole list.
        self.tunnels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The relays a running discovery found (nothing when it failed); never ends without one.
async fn finished(task: &mut Option<JoinHandle<Vec<RelayAddr>>>) -> Vec<RelayAddr> {
    match task {
        Some(task) => task.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}

/// Tells everyone who reads the exit's relay state (status, metrics, readiness, the DHT
/// announcement) what it is now.
struct Publisher {
    exit: Arc<Exit>,
    names: Arc<[RelayAddr]>,
    tunnels: Tunnels,
    registered: Arc<watch::Sender<bool>>,
}

impl Publisher {
    fn publish(&self) {
        let tunnels = self
            .tunnels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let registered = tunnels.iter().filter(|t| t.registered).count();
        // The relays as given, each once (a name's members are one relay).
        let mut given: Vec<RelayAddr> = self.names.to_vec();
        let mut up: Vec<RelayAddr> = Vec::new();
        for tunnel in &tunnels {
            if !given.contains(&tunnel.member.given) {
                given.push(tunnel.member.given.clone());
            }
            if tunnel.registered && !up.contains(&tunnel.member.given) {
                up.push(tunnel.member.given.clone());
            }
        }
        let exit = &self.exit;
        exit.metrics
            .relays
            .set(i64::try_from(tunnels.len()).unwrap_or(i64::MAX));
        exit.metrics
            .relays_registered
            .set(i64::try_from(registered).unwrap_or(i64::MAX));
        exit.metrics.relay_connected.set(i64::from(registered > 0));
        exit.relays_label.send_if_modified(|label| {
            let now = given
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ");
            let changed = *label != now;
            *label = now;
            changed
        });
        exit.tunnels.send_replace(
            tunnels
                .iter()
                .map(|t| ExitRelayStatus {
                    address: t.member.given.to_string(),
                    resolved: t.member.resolved().map(|at| at.to_string()),
                    registered: t.registered,
                })
                .collect(),
        );
        exit.registered_relays.send_if_modified(|relays| {
            let changed = *relays != up;
            *relays = up;
            changed
        });
        self.registered.send_replace(registered > 0);
    }
}
