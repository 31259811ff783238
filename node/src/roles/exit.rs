//! The exit: dials a relay (no public address needed), proves its identity, registers a signed
//! descriptor of its OHTTP keys, and serves the request streams the relay opens on that tunnel.
//! Reconnects with capped exponential backoff when the relay goes away.

pub mod access;
mod answer_budget;
mod backend;
pub mod config;
mod endpoint;
mod gateway;
mod key_follow;
mod relay_set;
mod replay;
mod rotation;
mod single_answer;
mod tunnel;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use libp2p_identity::Keypair;
use tokengo_proto::{
    descriptor::{Descriptor, DescriptorError, SignedDescriptor},
    key_config::KeyConfig,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::config::{BackendConfig, ExitConfig};
pub use backend::Backend;
pub use endpoint::{DEFAULT_ENDPOINTS, EndpointPolicy, EndpointRule, PathError, RuleError};
pub use gateway::Gateway;
pub use relay_set::Replenish;
pub use tunnel::TunnelError;

use crate::{
    clock::{Clock, unix_now},
    config::{
        Limits,
        defaults::{
            DRAIN_DEADLINE, KEY_FOLLOW_INTERVAL, MAX_TUNNEL_STREAMS, RELAY_RESOLVE_INTERVAL,
        },
    },
    net::resolve::{Resolve, SystemResolver},
    net::transport::{RelayAddr, TransportParams},
    ops::metrics::ExitMetrics,
    store::data_dir::DataDir,
    store::identity,
    store::keyring::Keyring,
    store::keys::KeySource,
};

/// How long a descriptor is valid; the exit re-registers at half of it.
const DESCRIPTOR_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Backoff bounds for reconnecting to the relay.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Loads the exit for `tokengo exit`: its identity and keys, its backend, the access tokens
/// it requires (watched for changes until `shutdown`).
pub fn prepare(config: &ExitConfig, shutdown: &CancellationToken) -> anyhow::Result<Exit> {
    let keys = KeySource::of(&config.data_dir, config.keys_dir.as_deref());
    let mut exit = Exit::load_from(&keys, &config.backend, config.limits.clone())?;
    exit.set_public(config.public);
    exit.set_key_rotation(config.key_rotation);
    if let Some(path) = &config.access_token_file {
        let tokens = access::load_tokens(path)?;
        tracing::info!(
            tokens = tokens.len(),
            "requests must carry one of the access tokens in {}",
            path.display()
        );
        exit.gateway.access().require(tokens);
        let (gateway, path, stop) = (Arc::clone(&exit.gateway), path.clone(), shutdown.clone());
        tokio::spawn(async move { gateway.access().watch(path, stop).await });
    }
    if config.public {
        warn_if_public_credentials(config);
    }
    Ok(exit)
}

/// Runs a prepared exit until shutdown or until it stops on its own. Without a configured
/// relay (a public exit only), relays are discovered on the DHT and the exit registers with up
/// to `max_relays` of them, one tunnel each; and its DHT announcement when public. `registered` turns
/// true once a relay took the exit's registration (the admin probe watches it).
pub async fn serve(
    config: ExitConfig,
    exit: Exit,
    registered: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let announcing = spawn_announcer(&config, &exit, registered.subscribe(), &shutdown);
    let result = match relays(&config, &exit, &shutdown).await {
        Ok(relays) => {
            exit.relays_label.send_replace(
                relays
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            let peer = exit.peer_id();
            let announce: RegisteredHook = Arc::new(move |relay: &RelayAddr| {
                println!("exit {peer} registered with relay {relay}");
            });
            if config.relays.is_empty() {
                let replenish = replenish(&config, &exit);
                exit.run_discovering(
                    relays,
                    replenish,
                    registered,
                    Some(announce),
                    shutdown.clone(),
                )
                .await
                .map_err(anyhow::Error::from)
            } else {
                exit.run_many(relays, registered, Some(announce), shutdown.clone())
                    .await
                    .map_err(anyhow::Error::from)
            }
        }
        Err(e) => Err(e.into()),
    };
    // The exit may stop on its own (a relay that refuses it): the admin listener goes too.
    shutdown.cancel();
    if let Some(task) = announcing
        && let Err(error) = task.await
    {
        tracing::warn!(%error, "DHT announcement task failed");
    }
    result
}

/// Tells the operator of a public exit that holds backend credentials that anyone can spend
/// them (unless an access token limits who can).
fn warn_if_public_credentials(config: &ExitConfig) {
    if !config.backend.holds_credentials() {
        return;
    }
    if config.access_token_file.is_some() {
        tracing::info!(
            "public exit: only holders of an access token can use its backend credentials"
        );
    } else {
        tracing::warn!(
            "this exit is PUBLIC and holds backend credentials (--api-key or an Authorization-like --header): ANYONE who finds it can use them, anonymously, at your cost. Limit it to your group with --access-token-file, or drop --public and give it --relay"
        );
    }
}

/// Starts announcing the exit on the DHT when configured; it publishes once registered.
/// A failure to announce (port taken, no DHT) is logged at once and the exit serves on.
fn spawn_announcer(
    config: &ExitConfig,
    exit: &Exit,
    registered: watch::Receiver<bool>,
    shutdown: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let announce = config.announce.as_ref()?;
    let guard = crate::net::discovery::DialGuard {
        refused: exit.metrics.dht.dials_refused.clone(),
        observer: None,
    };
    let announcer = exit.announcer(announce, registered, guard);
    let dht = config.dht.clone();
    let shutdown = shutdown.clone();
    Some(tokio::spawn(async move {
        if let Err(error) = crate::net::discovery::announce(&dht, announcer, shutdown).await {
            tracing::warn!(%error, "the exit is NOT announced on the DHT; it serves on");
        }
    }))
}

/// The relays to register with: the configured ones, or what discovery (with the cache and
/// the fallback relays) finds.
async fn relays(
    config: &ExitConfig,
    exit: &Exit,
    shutdown: &CancellationToken,
) -> Result<Vec<RelayAddr>, crate::net::discovery::DiscoveryError> {
    if !config.relays.is_empty() {
        return Ok(config.relays.clone());
    }
    let seek = seek(config, exit);
    let found = crate::net::discovery::discover(&config.dht, seek, shutdown).await;
    Ok(
        crate::net::discovery::or_fallback(found, &config.fallback_relays)?
            .into_iter()
            .take(config.max_relays)
            .collect(),
    )
}

/// What a discovery of relays for this exit looks for.
fn seek(config: &ExitConfig, exit: &Exit) -> crate::net::discovery::Seek {
    crate::net::discovery::Seek::new(
        Some(crate::net::discovery::RelayCache::in_dir(&config.data_dir)),
        config.max_relays,
        crate::net::discovery::settle_for(&config.dht),
        TransportParams {
            idle_timeout: config.limits.quic_idle_timeout,
            max_incoming_streams: 0,
            keep_alive: false,
        },
        &exit.metrics.dht,
    )
}

/// How a discovering exit replaces relays it lost.
fn replenish(config: &ExitConfig, exit: &Exit) -> Replenish {
    Replenish {
        dht: config.dht.clone(),
        seek: seek(config, exit),
        fallback: config.fallback_relays.clone(),
        want: config.max_relays,
    }
}

/// Called the first time the exit registers with each relay.
pub type RegisteredHook = Arc<dyn Fn(&RelayAddr) + Send + Sync>;

/// What the admin listener reads from a running exit: readiness, status and metrics.
#[derive(Debug, Clone)]
pub struct ExitProbe {
    peer_id: libp2p_identity::PeerId,
    public: bool,
    relay: watch::Receiver<String>,
    tunnels: watch::Receiver<Vec<crate::ops::status::ExitRelayStatus>>,
    dht: watch::Receiver<Option<crate::ops::status::DhtStatus>>,
    registered: watch::Receiver<bool>,
    gateway: Arc<Gateway>,
    metrics: Arc<ExitMetrics>,
}

impl ExitProbe {
    /// The exit's metrics.
    #[must_use]
    pub fn metrics(&self) -> &ExitMetrics {
        &self.metrics
    }

    /// Why the exit is not ready: it is ready while registered with its relay and while its
    /// backend answers (probed now, so an outage shows at once).
    pub async fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !*self.registered.borrow() {
            reasons.push("exit: not registered with a relay".to_owned());
        }
        let up = self.gateway.backend().probe().await;
        self.metrics.backend_up.set(i64::from(up));
        if !up {
            reasons.push("exit: backend unreachable".to_owned());
        }
        reasons
    }

    /// Mirrors the registration state into its gauge, and probes the backend so
    /// `backend_up` says how it is now, not how it was at the last request.
    pub async fn refresh(&self) {
        self.metrics
            .relay_connected
            .set(i64::from(*self.registered.borrow()));
        let up = self.gateway.backend().probe().await;
        self.metrics.backend_up.set(i64::from(up));
    }

    /// The exit's part of `/status`.
    #[must_use]
    pub fn status(&self, requests_per_sec: Option<f64>) -> crate::ops::status::ExitStatus {
        let expiry = self.metrics.descriptor_expiry.get();
        crate::ops::status::ExitStatus {
            peer_id: self.peer_id.to_string(),
            public: self.public,
            access_token_required: self.gateway.access().required(),
            relay: self.relay.borrow().clone(),
            registered: *self.registered.borrow(),
            relays: self.tunnels.borrow().clone(),
            backend_up: self.metrics.backend_up.get() == 1,
            keys: self.gateway.key_status(),
            descriptor_expires_at: u64::try_from(expiry).ok().filter(|at| *at > 0),
            requests_total: self.metrics.requests_total(),
            requests_per_sec,
            errors_total: self.metrics.errors_total(),
            streams_in_flight: self.metrics.streams_in_flight.get(),
            gateway_overhead: (&self.metrics.overhead()).into(),
            backend_latency: (&self.metrics.backend()).into(),
            dht: self.dht.borrow().clone(),
        }
    }
}

/// When a new descriptor is issued: now, but always after the one it replaces. Clients take
/// keys from the descriptor issued last and hold an exit whose sources show two different
/// descriptors issued in the same second (they cannot tell which is newer), so a rotation in
/// the second after a registration would otherwise hold the exit until its next re-signing,
/// hours later. A second ahead is well within the clock skew verifiers allow.
fn issue_time(now: u64, previous: Option<u64>) -> u64 {
    previous.map_or(now, |previous| now.max(previous.saturating_add(1)))
}

/// An exit with its keys and backend, not yet connected.
#[derive(Debug)]
pub struct Exit {
    identity: Keypair,
    gateway: Arc<Gateway>,
    /// The OHTTP keys (replaced at each rotation).
    keyring: Arc<Mutex<Keyring>>,
    /// The keyring's file, rewritten at each rotation.
    keyring_path: PathBuf,
    /// Time between key rotations; `None`: the keys are never rotated by this process.
    key_rotation: Option<Duration>,
    /// How often the keyring file is read again when it is kept in a read-only key directory
    /// (`--keys-dir`), whose writer rotates it; `None` for keys in the data directory. Default
    /// [`KEY_FOLLOW_INTERVAL`] (5 s).
    key_follow: Option<Duration>,
    /// Bumped at each key rotation: every tunnel registers the new descriptor.
    key_changes: watch::Sender<u64>,
    limits: Limits,
    metrics: Arc<ExitMetrics>,
    /// The relays it registers with, for `/status` (set once discovery has chosen them, so
    /// the admin endpoint can answer while discovery runs).
    relays_label: watch::Sender<String>,
    /// Whether its operator opened it to the public (`--public`), for `/status`.
    public: bool,
    /// The descriptor registered with every relay (one for all, so every source of it shows
    /// the same bytes), and what the DHT announcement answers.
    current: watch::Sender<Option<SignedDescriptor>>,
    /// The relays it is registered with now (the DHT announcement names them).
    registered_relays: watch::Sender<Vec<RelayAddr>>,
    /// Every relay it keeps a tunnel to, and whether that tunnel is registered, for `/status`.
    tunnels: watch::Sender<Vec<crate::ops::status::ExitRelayStatus>>,
    /// The DHT announcement's state; `None` while the exit does not announce.
    dht: Arc<watch::Sender<Option<crate::ops::status::DhtStatus>>>,
    /// Resolves the relays given by DNS name, to every address. Default: the system
    /// resolver.
    resolver: Arc<dyn Resolve>,
    /// How often those names are resolved again. Default [`RELAY_RESOLVE_INTERVAL`] (10 s).
    resolve_every: Duration,
}

impl Exit {
    /// Loads (or creates on first start) the identity and OHTTP keys in `data_dir`.
    pub fn load(
        data_dir: &DataDir,
        backend: &BackendConfig,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        Self::load_with_clock(data_dir, backend, limits, Clock::system())
    }

    /// Loads the identity and OHTTP keys from `keys`: created on first start in a data
    /// directory, only read from a read-only key directory (`--keys-dir`).
    pub fn load_from(
        keys: &KeySource,
        backend: &BackendConfig,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        Self::load_keys(keys, backend, limits, Clock::system())
    }

    /// [`Exit::load`] with the clock that dates requests checks against (tests move it).
    pub fn load_with_clock(
        data_dir: &DataDir,
        backend: &BackendConfig,
        limits: Limits,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        Self::load_keys(
            &KeySource::DataDir(data_dir.clone()),
            backend,
            limits,
            clock,
        )
    }

    fn load_keys(
        keys: &KeySource,
        backend: &BackendConfig,
        limits: Limits,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let (identity, created) = keys.identity(tokengo_proto::data_dir::EXIT_IDENTITY_FILE)?;
        if created {
            tracing::info!(peer_id = %identity::peer_id(&identity), "created exit identity");
        }
        let keyring_path = keys.file(tokengo_proto::data_dir::EXIT_KEYRING_FILE);
        let (keyring, created) = keys.keyring(unix_now())?;
        if created {
            tracing::info!("created OHTTP key");
        }
        let backend = Backend::new(backend).context("building the backend HTTP client")?;
        let metrics = Arc::new(ExitMetrics::new());
        let gateway =
            Gateway::new(&keyring, backend, limits.clone(), Arc::clone(&metrics)).with_clock(clock);
        Ok(Self {
            identity,
            gateway: Arc::new(gateway),
            keyring: Arc::new(Mutex::new(keyring)),
            keyring_path,
            key_rotation: None,
            key_follow: matches!(keys, KeySource::ReadOnly(_)).then_some(KEY_FOLLOW_INTERVAL),
            key_changes: watch::Sender::new(0),
            limits,
            metrics,
            relays_label: watch::Sender::new(String::new()),
            public: false,
            current: watch::Sender::new(None),
            registered_relays: watch::Sender::new(Vec::new()),
            tunnels: watch::Sender::new(Vec::new()),
            dht: Arc::new(watch::Sender::new(None)),
            resolver: Arc::new(SystemResolver),
            resolve_every: RELAY_RESOLVE_INTERVAL,
        })
    }

    /// What announces this exit on the DHT with its own identity: the exit key once it is
    /// registered (`registered` true), and exit-info with its descriptor and current relays.
    /// An exit without a reachable address (behind NAT) is stored by nobody: the announcement
    /// then reports `no_external_address`, and clients know the exit only from relays' lists.
    #[must_use]
    pub fn announcer(
        &self,
        announce: &config::ExitAnnounceConfig,
        registered: watch::Receiver<bool>,
        guard: crate::net::discovery::DialGuard,
    ) -> crate::net::discovery::Announcer {
        crate::net::discovery::Announcer {
            identity: self.identity.clone(),
            listen: announce.listen,
            external_ips: announce.external_ips.clone(),
            info: crate::net::discovery::Answer::Exit {
                info: crate::net::discovery::exit_info_source(
                    self.identity.clone(),
                    self.current.subscribe(),
                    self.registered_relays.subscribe(),
                ),
                registered,
            },
            status: Arc::clone(&self.dht),
            metrics: self.metrics.dht.clone(),
            guard,
        }
    }

    /// The handle the admin listener reads; `registered` is a receiver of the channel whose
    /// sender [`Exit::run`] gets.
    #[must_use]
    pub fn probe(&self, relay: RelayAddr, registered: watch::Receiver<bool>) -> ExitProbe {
        ExitProbe {
            relay: watch::Sender::new(relay.to_string()).subscribe(),
            ..self.probe_all(registered)
        }
    }

    /// The probe for an exit registering with the relays given to [`Exit::run_many`] (as
    /// `tokengo exit` knows them after discovery).
    #[must_use]
    pub fn probe_all(&self, registered: watch::Receiver<bool>) -> ExitProbe {
        ExitProbe {
            peer_id: self.peer_id(),
            public: self.public,
            relay: self.relays_label.subscribe(),
            tunnels: self.tunnels.subscribe(),
            dht: self.dht.subscribe(),
            registered,
            gateway: Arc::clone(&self.gateway),
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// Resolves the relays given by DNS name with `resolver` (every `every`) instead of the
    /// system resolver every [`RELAY_RESOLVE_INTERVAL`]: how tests give one name several
    /// addresses (`resolve::FixedTable`).
    pub fn set_resolver(&mut self, resolver: Arc<dyn Resolve>, every: Duration) {
        self.resolver = resolver;
        self.resolve_every = every;
    }

    /// Marks the exit as serving the public (what `/status` reports; set before probing).
    pub fn set_public(&mut self, public: bool) {
        self.public = public;
    }

    /// Rotates the OHTTP key every `period` while running (`None`: never). The previous key
    /// is accepted for [`crate::store::keyring::overlap`] after each rotation; every relay gets the new
    /// descriptor at once.
    pub fn set_key_rotation(&mut self, period: Option<Duration>) {
        self.key_rotation = period;
    }

    /// How often an exit whose keys are in a read-only key directory reads its keyring
    /// again (tests shorten it). No effect on keys in the data directory.
    pub fn set_key_follow_interval(&mut self, every: Duration) {
        if self.key_follow.is_some() {
            self.key_follow = Some(every);
        }
    }

    /// Starts what changes the keys while the exit runs: its own rotation schedule, or the
    /// follower of a read-only key directory; `None` when the keys never change.
    fn spawn_key_upkeep(&self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        if let Some(period) = self.key_rotation {
            let rotation = rotation::Rotation {
                period,
                path: self.keyring_path.clone(),
                ring: Arc::clone(&self.keyring),
                gateway: Arc::clone(&self.gateway),
                changes: self.key_changes.clone(),
            };
            return Some(tokio::spawn(rotation.run(stop)));
        }
        let follow = key_follow::KeyFollow {
            path: self.keyring_path.clone(),
            every: self.key_follow?,
            ring: Arc::clone(&self.keyring),
            gateway: Arc::clone(&self.gateway),
            changes: self.key_changes.clone(),
        };
        Some(tokio::spawn(follow.run(stop)))
    }

    /// The key configurations the descriptor lists: the current key only. Clients encrypt
    /// to the first key; the previous one is still accepted during its overlap without being
    /// listed, so retiring it changes no descriptor (a changed descriptor that reached one
    /// relay before another would hold the exit at clients of both).
    fn published_keys(&self) -> Vec<KeyConfig> {
        self.keyring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .configs()
            .into_iter()
            .take(1)
            .collect()
    }

    /// Who may use the exit: require access tokens through it before running.
    #[must_use]
    pub fn access(&self) -> &access::Access {
        self.gateway.access()
    }

    /// The exit's PeerId (its id at the relay).
    #[must_use]
    pub fn peer_id(&self) -> libp2p_identity::PeerId {
        identity::peer_id(&self.identity)
    }

    /// The current descriptor and its expiry (Unix seconds): the one registered with every
    /// relay while it has more than half its lifetime left and says the same, else a freshly
    /// signed one that becomes current.
    fn descriptor(&self, models: &[String]) -> Result<(SignedDescriptor, u64), DescriptorError> {
        let now = unix_now();
        if let Some(current) = self.current.borrow().as_ref()
            && let Ok(desc) = SignedDescriptor::verify(current.as_bytes(), now)
            && desc.expires_at.saturating_sub(now) > DESCRIPTOR_LIFETIME.as_secs() / 2
            && desc.models == models
            && desc.key_configs == self.published_keys()
        {
            return Ok((current.clone(), desc.expires_at));
        }
        let previous = self
            .current
            .borrow()
            .as_ref()
            .and_then(|current| SignedDescriptor::verify(current.as_bytes(), now).ok())
            .map(|desc| desc.issued_at);
        let issued_at = issue_time(now, previous);
        let descriptor = Descriptor {
            peer_id: self.peer_id(),
            key_configs: self.published_keys(),
            models: models.to_vec(),
            issued_at,
            expires_at: issued_at + DESCRIPTOR_LIFETIME.as_secs(),
            max_streams: MAX_TUNNEL_STREAMS,
            access_token_required: self.gateway.access().required(),
        };
        let expires_at = descriptor.expires_at;
        let signed = SignedDescriptor::sign(&descriptor, &self.identity)?;
        self.current.send_replace(Some(signed.clone()));
        Ok((signed, expires_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_is_issued_after_the_one_it_replaces() {
        assert_eq!(issue_time(1000, None), 1000);
        assert_eq!(issue_time(1000, Some(900)), 1000);
        assert_eq!(
            issue_time(1000, Some(1000)),
            1001,
            "a change in the same second"
        );
        assert_eq!(
            issue_time(1000, Some(1001)),
            1002,
            "two changes in one second"
        );
        assert_eq!(issue_time(1000, Some(u64::MAX)), u64::MAX);
    }
}
