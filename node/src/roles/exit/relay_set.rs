//! The relays an exit keeps registered with: one tunnel task per relay, each reconnecting on
//! its own with backoff; the exit is registered while any tunnel is. A discovering exit also
//! replaces relays it lost, so it keeps `max_relays` registrations over time.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    Exit, RegisteredHook,
    tunnel::{Ended, TunnelError},
};
use crate::{
    net::discovery::{self, DhtConfig, Seek},
    net::transport::RelayAddr,
    ops::status::ExitRelayStatus,
};

/// How long a discovered relay may stay unreachable before the exit looks for another.
/// A restarting relay is back well within it; a relay that is gone is replaced after it.
const LOST_AFTER: Duration = Duration::from_secs(10);
/// First wait before discovering again while fewer relays than wanted are held; it doubles
/// after each discovery that did not fill the set.
const REDISCOVER_MIN: Duration = Duration::from_secs(5);
/// Longest wait between discoveries while the set is not full.
const REDISCOVER_MAX: Duration = Duration::from_secs(300);

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

/// Every relay the exit keeps a tunnel to, with whether it is registered.
type Tunnels = Arc<Mutex<Vec<(RelayAddr, bool)>>>;

/// What one tunnel task reports when it ends.
type TunnelEnd = (RelayAddr, Result<Ended, TunnelError>);

impl Exit {
    /// Keeps a registered tunnel to `relay` until shutdown. `registered` turns true on every
    /// successful registration and false while disconnected. Fails only on errors that
    /// retrying cannot fix (the relay is not who its address says, the relay refuses us).
    pub async fn run(
        self,
        relay: RelayAddr,
        registered: watch::Sender<bool>,
        shutdown: CancellationToken,
    ) -> Result<(), TunnelError> {
        self.run_many(vec![relay], registered, None, shutdown).await
    }

    /// Keeps a registered tunnel to each of `relays` until shutdown, each reconnecting with
    /// its own backoff. `registered` is true while at least one tunnel is registered; `hook`
    /// is called at each relay's first registration. Fails when every relay failed with an
    /// error retrying cannot fix.
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
        let rotating = exit.rotation().map(|rotation| {
            let stop = shutdown.child_token();
            (tokio::spawn(rotation.run(stop.clone())), stop)
        });
        let set = RelaySet {
            exit: Arc::clone(&exit),
            models: Arc::new(models),
            tunnels: Arc::new(Mutex::new(Vec::new())),
            registered: Arc::new(registered),
            hook,
            give_up: replenish.as_ref().map(|_| LOST_AFTER),
            shutdown: shutdown.clone(),
        };
        let result = set.supervise(relays, replenish).await;
        if let Some((task, stop)) = rotating {
            stop.cancel();
            let _ = task.await;
        }
        result
    }
}

/// The running tunnels of one exit.
struct RelaySet {
    exit: Arc<Exit>,
    models: Arc<Vec<String>>,
    tunnels: Tunnels,
    registered: Arc<watch::Sender<bool>>,
    hook: Option<RegisteredHook>,
    /// Set for discovered relays: how long one may stay unreachable.
    give_up: Option<Duration>,
    shutdown: CancellationToken,
}

impl RelaySet {
    /// Runs the tunnels until shutdown (or until every fixed relay failed for good),
    /// replacing lost relays when `replenish` says how.
    async fn supervise(
        &self,
        relays: Vec<RelayAddr>,
        replenish: Option<Replenish>,
    ) -> Result<(), TunnelError> {
        let mut running: JoinSet<TunnelEnd> = JoinSet::new();
        for relay in relays {
            self.start(&mut running, relay);
        }
        let mut errors: Vec<TunnelError> = Vec::new();
        let mut discovery: Option<tokio::task::JoinHandle<Vec<RelayAddr>>> = None;
        let mut wait = REDISCOVER_MIN;
        let mut next_discovery = tokio::time::Instant::now() + wait;
        loop {
            let short = replenish
                .as_ref()
                .is_some_and(|r| self.held().len() < r.want);
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                Some(done) = running.join_next(), if !running.is_empty() => {
                    let Ok((relay, outcome)) = done else { continue };
                    self.forget(&relay);
                    match outcome {
                        Ok(Ended::Shutdown) => {}
                        Ok(Ended::GaveUp) => {
                            wait = REDISCOVER_MIN;
                            next_discovery = tokio::time::Instant::now();
                        }
                        Err(error) => {
                            tracing::warn!(%relay, "{error:#}");
                            errors.push(error);
                        }
                    }
                    if running.is_empty() && replenish.is_none() {
                        break;
                    }
                }
                () = tokio::time::sleep_until(next_discovery), if short && discovery.is_none() => {
                    if let Some(replenish) = &replenish {
                        discovery = Some(self.discover(replenish));
                    }
                }
                found = finished(&mut discovery), if discovery.is_some() => {
                    discovery = None;
                    let want = replenish.as_ref().map_or(0, |r| r.want);
                    let held = self.held();
                    for relay in found
                        .into_iter()
                        .filter(|r| !held.iter().any(|h| h.peer_id() == r.peer_id()))
                        .take(want.saturating_sub(held.len()))
                    {
                        tracing::info!(%relay, "registering with a newly discovered relay");
                        self.start(&mut running, relay);
                    }
                    wait = if self.held().len() < want {
                        (wait * 2).min(REDISCOVER_MAX)
                    } else {
                        REDISCOVER_MIN
                    };
                    next_discovery = tokio::time::Instant::now() + wait;
                }
            }
        }
        if let Some(task) = discovery {
            task.abort();
        }
        while let Some(done) = running.join_next().await {
            if let Ok((relay, Err(error))) = done {
                tracing::warn!(%relay, "{error}");
                errors.push(error);
            }
        }
        self.registered.send_replace(false);
        self.exit.metrics.relay_connected.set(0);
        match errors.into_iter().next() {
            // Every fixed relay refused the exit for good: nothing left to serve through.
            Some(error) if replenish.is_none() && !self.shutdown.is_cancelled() => Err(error),
            _ => Ok(()),
        }
    }

    /// Starts the tunnel to `relay` (a relay already held is not started twice).
    fn start(&self, running: &mut JoinSet<TunnelEnd>, relay: RelayAddr) {
        {
            let mut tunnels = self.lock();
            if tunnels.iter().any(|(r, _)| r.peer_id() == relay.peer_id()) {
                return;
            }
            tunnels.push((relay.clone(), false));
        }
        self.publish();
        let (tx, rx) = watch::channel(false);
        self.follow(relay.clone(), rx);
        let exit = Arc::clone(&self.exit);
        let models = Arc::clone(&self.models);
        let give_up = self.give_up;
        let shutdown = self.shutdown.clone();
        running.spawn(async move {
            let outcome = exit.run_one(&relay, &models, tx, give_up, &shutdown).await;
            (relay, outcome)
        });
    }

    /// Folds one tunnel's registration state into the exit's: registered while any tunnel
    /// is; the hook runs at the tunnel's first registration.
    fn follow(&self, relay: RelayAddr, mut rx: watch::Receiver<bool>) {
        let tunnels = Arc::clone(&self.tunnels);
        let state = Self::publisher(self);
        let hook = self.hook.clone();
        tokio::spawn(async move {
            let mut announced = false;
            while rx.changed().await.is_ok() {
                let now = *rx.borrow_and_update();
                if let Some(entry) = tunnels
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter_mut()
                    .find(|(r, _)| r.peer_id() == relay.peer_id())
                {
                    entry.1 = now;
                }
                state.publish();
                if now
                    && !announced
                    && let Some(hook) = &hook
                {
                    announced = true;
                    hook(&relay);
                }
            }
        });
    }

    /// Drops `relay` from the set (its task ended).
    fn forget(&self, relay: &RelayAddr) {
        self.lock().retain(|(r, _)| r.peer_id() != relay.peer_id());
        self.publish();
    }

    /// The relays held now.
    fn held(&self) -> Vec<RelayAddr> {
        self.lock().iter().map(|(r, _)| r.clone()).collect()
    }

    /// Runs a discovery (its cache is rewritten with what verified) and returns the relays
    /// found, or the fallback relays when it found none.
    fn discover(&self, replenish: &Replenish) -> tokio::task::JoinHandle<Vec<RelayAddr>> {
        let dht = replenish.dht.clone();
        let mut seek = replenish.seek.clone();
        let held = self.held().len();
        // Relays already held verify too: ask for enough to replace the missing ones.
        seek.want = replenish.want.saturating_add(held);
        let fallback = replenish.fallback.clone();
        let shutdown = self.shutdown.child_token();
        tracing::info!(
            held,
            want = replenish.want,
            "fewer relays than wanted; discovering"
        );
        tokio::spawn(async move {
            let found = discovery::discover(&dht, seek, &shutdown).await;
            match discovery::or_fallback(found, &fallback) {
                Ok(relays) => relays,
                Err(error) => {
                    tracing::warn!(%error, "no relay found; trying again later");
                    Vec::new()
                }
            }
        })
    }

    fn publisher(&self) -> Publisher {
        Publisher {
            exit: Arc::clone(&self.exit),
            tunnels: Arc::clone(&self.tunnels),
            registered: Arc::clone(&self.registered),
        }
    }

    fn publish(&self) {
        self.publisher().publish();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(RelayAddr, bool)>> {
        // Each update is one push, retain or flag: a poisoned lock still holds a whole list.
        self.tunnels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The relays a running discovery found (nothing when it failed); never ends without one.
async fn finished(task: &mut Option<tokio::task::JoinHandle<Vec<RelayAddr>>>) -> Vec<RelayAddr> {
    match task {
        Some(task) => task.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}

/// Tells everyone who reads the exit's relay state (status, metrics, readiness, the DHT
/// announcement) what it is now.
struct Publisher {
    exit: Arc<Exit>,
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
        let up: Vec<RelayAddr> = tunnels
            .iter()
            .filter(|(_, registered)| *registered)
            .map(|(relay, _)| relay.clone())
            .collect();
        let exit = &self.exit;
        exit.metrics
            .relays
            .set(i64::try_from(tunnels.len()).unwrap_or(i64::MAX));
        exit.metrics
            .relays_registered
            .set(i64::try_from(up.len()).unwrap_or(i64::MAX));
        exit.metrics.relay_connected.set(i64::from(!up.is_empty()));
        exit.relays_label.send_if_modified(|label| {
            let now = tunnels
                .iter()
                .map(|(relay, _)| relay.to_string())
                .collect::<Vec<_>>()
                .join(" ");
            let changed = *label != now;
            *label = now;
            changed
        });
        exit.tunnels.send_replace(
            tunnels
                .iter()
                .map(|(relay, registered)| ExitRelayStatus {
                    address: relay.to_string(),
                    registered: *registered,
                })
                .collect(),
        );
        let any = !up.is_empty();
        exit.registered_relays.send_if_modified(|relays| {
            let changed = *relays != up;
            *relays = up;
            changed
        });
        self.registered.send_replace(any);
    }
}
