//! `tokengo exit`'s configuration: the keys its YAML file takes (`ExitFile`; any other key
//! is refused) and the checked [`ExitConfig`] merged from flags, environment and that file.
//! The backend ([`BackendConfig`]) and the gate (endpoint policy, replay window, answer
//! budget) are also what `tokengo serve`'s exit runs with, so serve builds them from here.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::{EndpointPolicy, EndpointRule};
use crate::{
    cli::{BackendArgs, ExitArgs, ExitGateArgs},
    config::{
        self, ConfigError, DhtFile, Limits, LimitsFile, ObservabilityConfig, OneOrMany, Schema,
        WorkerThreads,
        defaults::{
            ANSWER_BUDGET_WAIT_SECS, DEFAULT_BACKEND, DEFAULT_BACKEND_CONNECT_TIMEOUT,
            DEFAULT_BACKEND_IDLE_TIMEOUT, DEFAULT_KEY_ROTATION_HOURS, DEFAULT_MAX_RELAYS,
            MAX_CLOCK_SKEW_SECS, MAX_EXIT_RELAYS, MAX_KEY_ROTATION_HOURS, MAX_RELAYS,
            MIN_KEY_ROTATION, REPLAY_CACHE_ENTRIES,
        },
        invalid, out_of,
    },
    net::{discovery::DhtConfig, transport::RelayAddr},
    store::data_dir::DataDir,
};

/// The keys of `tokengo exit`'s YAML file. Each is also a flag (`--relay` for `relay`, ...)
/// except those marked file-only; the meaning and default of each is on the checked
/// configuration and in `config::defaults`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExitFile {
    /// The relays to register with: one, or a list.
    relay: Option<OneOrMany>,
    /// Whether the exit serves the public (DHT discovery of relays, announcing).
    public: Option<bool>,
    /// File of access tokens requests must carry.
    access_token_file: Option<PathBuf>,
    /// The AI backend's base URL.
    backend: Option<String>,
    /// API key sent to the backend as `Authorization: Bearer`.
    api_key: Option<String>,
    /// Extra backend headers, `Name: value`.
    #[serde(default)]
    headers: Vec<String>,
    /// Seconds without a byte from the backend before a request is abandoned (file-only).
    backend_idle_timeout_secs: Option<u64>,
    /// Seconds a backend connection may take to establish (file-only).
    backend_connect_timeout_secs: Option<u64>,
    /// Endpoints passed to the backend besides (or instead of) the defaults.
    #[serde(default)]
    allow: Vec<String>,
    /// Whether the default endpoints pass too.
    allow_defaults: Option<bool>,
    /// Largest accepted distance between a request's Date and the exit's clock.
    max_clock_skew_secs: Option<u64>,
    /// Most recent requests remembered against replay.
    replay_cache_entries: Option<usize>,
    /// Most bytes of single-message answers held at once.
    answer_budget_bytes: Option<usize>,
    /// Seconds an answer may wait for the answer budget before a 503.
    answer_budget_wait_secs: Option<u64>,
    /// Seconds a request may wait for its answer to begin.
    request_timeout_secs: Option<u64>,
    /// Hours between OHTTP key rotations (0: off).
    key_rotation_hours: Option<f64>,
    /// Where the identity and OHTTP keys live (and the relay cache).
    data_dir: Option<PathBuf>,
    /// Read-only directory the identity and OHTTP keys are read from instead.
    keys_dir: Option<PathBuf>,
    /// Threads that run the exit's tasks.
    worker_threads: Option<usize>,
    /// Admin endpoint address (off when absent).
    admin_listen: Option<String>,
    /// OTLP collector base URL for traces.
    otlp_endpoint: Option<String>,
    /// DHT bootstrap peers (multiaddrs with /p2p/).
    #[serde(default)]
    bootstrap: Vec<String>,
    /// Kademlia protocol name.
    dht_protocol: Option<String>,
    /// Addresses discovery may dial: public, loopback, any.
    address_policy: Option<String>,
    /// Seconds discovery may take at start (file-only).
    discovery_timeout_secs: Option<u64>,
    /// Relays used when discovery and the cache yield none.
    #[serde(default)]
    fallback_relays: Vec<String>,
    /// Most discovered relays registered with.
    max_relays: Option<usize>,
    /// Whether the exit announces itself on the DHT.
    dht_announce: Option<bool>,
    /// UDP address of the exit's DHT node.
    dht_listen: Option<String>,
    /// The exit's public IPs (`/ip4/X`, `/ip6/X`).
    #[serde(default)]
    external_addrs: Vec<String>,
    /// Largest request body decoded, in bytes (file-only).
    max_request_body_bytes: Option<usize>,
    /// Largest non-streamed response body, in bytes (file-only).
    max_response_body_bytes: Option<usize>,
    /// Seconds without any packet before a discovery dial's connection is dropped
    /// (file-only).
    quic_idle_timeout_secs: Option<u64>,
    /// Seconds a write may wait for a relay that takes no bytes (file-only).
    write_stall_timeout_secs: Option<u64>,
    /// Seconds of silence after which a tunnel counts as dead.
    tunnel_liveness_secs: Option<u64>,
    // No `exit_answer_timeout_secs`: that bound is the relay's (and so is the flag).
}

impl Schema for ExitFile {
    const COMMAND: &'static str = "tokengo exit";
}

/// Checked configuration of `tokengo exit`.
#[derive(Debug, Clone)]
pub struct ExitConfig {
    /// The relays to register with, one tunnel each, all kept in one process; empty
    /// discovers relays on the DHT, which only a public exit does. At most
    /// [`MAX_EXIT_RELAYS`].
    pub relays: Vec<RelayAddr>,
    /// Time between OHTTP key rotations; `None` when rotation is off. Default
    /// [`DEFAULT_KEY_ROTATION_HOURS`] (168 hours). The previous key is accepted for
    /// [`crate::store::keyring::overlap`] after each rotation.
    pub key_rotation: Option<Duration>,
    /// Whether the exit serves the public: it may discover relays on the DHT, and anyone who
    /// finds it may use it. Default false: the exit serves only through the relay it was
    /// given, and one with neither is refused at start.
    pub public: bool,
    /// File of group access tokens requests must carry. Default none: no token needed.
    pub access_token_file: Option<PathBuf>,
    /// The DHT to discover relays on when no relay is given.
    pub dht: DhtConfig,
    /// Most discovered relays to register with. Default
    /// [`DEFAULT_MAX_RELAYS`] (3).
    pub max_relays: usize,
    /// Relays registered with when the DHT and the cache yield none. Default none.
    pub fallback_relays: Vec<RelayAddr>,
    /// DHT announcement of the exit (on `dht`). Default: on for a public exit, off otherwise;
    /// `dht_announce` may turn it off, and on only for a public exit (announcing lets anyone
    /// find it).
    pub announce: Option<ExitAnnounceConfig>,
    /// The AI backend.
    pub backend: BackendConfig,
    /// Where the exit keeps writable state (the relay cache), and its identity and OHTTP
    /// keys unless `keys_dir` is set (created there on first start).
    pub data_dir: DataDir,
    /// Read-only directory the identity and OHTTP keyring are read from (`--keys-dir`, a
    /// mounted Secret): never created or written there; a missing key is an error. Default
    /// none: the keys are in the data directory. Only with `key_rotation` off.
    pub keys_dir: Option<PathBuf>,
    /// Timeouts and sizes.
    pub limits: Limits,
    /// Admin endpoint and trace export.
    pub observability: ObservabilityConfig,
    /// Threads that run its tasks. Default: one per CPU core.
    pub worker_threads: WorkerThreads,
}

impl ExitConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: ExitArgs) -> Result<Self, ConfigError> {
        let file: ExitFile = config::load(args.common.config.as_deref())?;
        let max_relays = match args.max_relays.or(file.max_relays) {
            None => DEFAULT_MAX_RELAYS,
            Some(n) if MAX_RELAYS.contains(&n) => n,
            Some(_) => return Err(out_of("max_relays", &MAX_RELAYS, "")),
        };
        let file_relays = file.relay.clone().map(OneOrMany::into_vec);
        let relays = config::relay_addrs(
            "relay",
            &args.relays,
            file_relays.as_deref().unwrap_or_default(),
        )?;
        if relays.len() > MAX_EXIT_RELAYS {
            return Err(invalid(
                "relay",
                format!("at most {MAX_EXIT_RELAYS} relays per exit"),
            ));
        }
        let public = args.public || file.public.unwrap_or(false);
        if relays.is_empty() && !public {
            return Err(ConfigError::Missing {
                field: "relay",
                hint: "an exit is private by default and serves only through the relays it is given: pass --relay MULTIADDR (repeatable; TOKENGO_RELAY, YAML relay:), or --public (TOKENGO_PUBLIC=true, YAML public: true) to discover relays on the DHT and serve anyone who finds this exit",
            });
        }
        let key_rotation = key_rotation(args.key_rotation_hours.or(file.key_rotation_hours))?;
        let keys_dir = args.keys.keys_dir.or_else(|| file.keys_dir.clone());
        if let Some(dir) = &keys_dir
            && key_rotation.is_some()
        {
            return Err(invalid(
                "keys_dir",
                format!(
                    "{} is read-only, so this exit could not save the keyring its own key rotation makes: set --key-rotation-hours 0 (TOKENGO_KEY_ROTATION_HOURS=0, YAML key_rotation_hours: 0) and rotate the keys where they are written (in Kubernetes the operator rotates them in the Secret), or leave out --keys-dir to keep the keys in the data directory",
                    dir.display()
                ),
            ));
        }
        // Announcing lets anyone find the exit: only a public exit does, and by default.
        let announce = args.dht_announce.or(file.dht_announce).unwrap_or(public);
        if announce && !public {
            return Err(invalid(
                "dht_announce",
                "announcing on the DHT lets anyone find and use this exit: add --public (TOKENGO_PUBLIC=true, YAML public: true), or leave announcing off",
            ));
        }
        let announce = if announce {
            Some(ExitAnnounceConfig {
                listen: config::dht_listen(
                    args.dht_listen.as_deref().or(file.dht_listen.as_deref()),
                )?,
                external_ips: config::parse_external(config::flags_or_file(
                    &args.external_addrs,
                    &file.external_addrs,
                ))?,
            })
        } else {
            None
        };
        let dht = DhtFile {
            bootstrap: &file.bootstrap,
            dht_protocol: file.dht_protocol.as_deref(),
            address_policy: file.address_policy.as_deref(),
            discovery_timeout_secs: file.discovery_timeout_secs,
        };
        let limits = LimitsFile {
            max_request_body_bytes: file.max_request_body_bytes,
            max_response_body_bytes: file.max_response_body_bytes,
            quic_idle_timeout_secs: file.quic_idle_timeout_secs,
            write_stall_timeout_secs: file.write_stall_timeout_secs,
            tunnel_liveness_secs: file.tunnel_liveness_secs,
            ..LimitsFile::default()
        };
        Ok(Self {
            relays,
            key_rotation,
            public,
            access_token_file: args
                .access_token_file
                .or_else(|| file.access_token_file.clone()),
            dht: config::dht_config(&args.dht, &dht)?,
            fallback_relays: config::relay_addrs(
                "fallback_relays",
                &args.fallback.fallback_relays,
                &file.fallback_relays,
            )?,
            announce,
            max_relays,
            backend: BackendConfig::resolve(args.backend, &args.gate, &file.backend_file())?,
            data_dir: config::data_dir(&args.common, file.data_dir.as_deref())?,
            keys_dir,
            limits: with_gate(
                Limits::from_file(&limits)?
                    .with_request(&args.request, file.request_timeout_secs)?,
                &args.gate,
                &file.gate_file(),
            )?
            .with_tunnel_liveness(&args.liveness)?,
            observability: config::observability(
                &args.common,
                file.admin_listen.as_deref(),
                file.otlp_endpoint.as_deref(),
                "exit",
            )?,
            worker_threads: WorkerThreads::resolve(&args.common, file.worker_threads)?,
        })
    }
}

impl ExitFile {
    fn backend_file(&self) -> BackendFile<'_> {
        BackendFile {
            backend: self.backend.as_deref(),
            api_key: self.api_key.as_deref(),
            headers: &self.headers,
            backend_idle_timeout_secs: self.backend_idle_timeout_secs,
            backend_connect_timeout_secs: self.backend_connect_timeout_secs,
            allow: &self.allow,
            allow_defaults: self.allow_defaults,
        }
    }

    fn gate_file(&self) -> GateFile {
        GateFile {
            max_clock_skew_secs: self.max_clock_skew_secs,
            replay_cache_entries: self.replay_cache_entries,
            answer_budget_bytes: self.answer_budget_bytes,
            answer_budget_wait_secs: self.answer_budget_wait_secs,
        }
    }
}

/// How an exit announces itself on the DHT.
#[derive(Debug, Clone)]
pub struct ExitAnnounceConfig {
    /// UDP address of the exit's libp2p swarm. Default
    /// [`DEFAULT_DHT_LISTEN`](crate::config::defaults::DEFAULT_DHT_LISTEN) (`0.0.0.0:4001`).
    pub listen: SocketAddr,
    /// The exit's confirmed public IPs. Default none: then the exit is announced only under
    /// the `loopback` policy and otherwise reported as not announced (`no_external_address`);
    /// clients then know it only from the lists of the relays it registers with.
    pub external_ips: Vec<IpAddr>,
}

/// The key rotation period from hours (`None` when 0: off; default
/// [`DEFAULT_KEY_ROTATION_HOURS`]). A fraction of an hour is allowed down to
/// [`MIN_KEY_ROTATION`], so tests and the fault suite can rotate every few seconds.
pub(crate) fn key_rotation(hours: Option<f64>) -> Result<Option<Duration>, ConfigError> {
    let hours = hours.unwrap_or(DEFAULT_KEY_ROTATION_HOURS);
    if hours == 0.0 {
        return Ok(None);
    }
    if !hours.is_finite() || !(0.0..=MAX_KEY_ROTATION_HOURS).contains(&hours) {
        return Err(invalid(
            "key_rotation_hours",
            format!("must be 0 (off) or a number of hours up to {MAX_KEY_ROTATION_HOURS}"),
        ));
    }
    let period = Duration::from_secs_f64(hours * 3600.0);
    if period < MIN_KEY_ROTATION {
        return Err(invalid(
            "key_rotation_hours",
            "must be at least one second (0.0003 hours), or 0 to turn rotation off",
        ));
    }
    Ok(Some(period))
}

/// The backend keys of a file (exit, serve).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BackendFile<'a> {
    /// `backend`.
    pub(crate) backend: Option<&'a str>,
    /// `api_key`.
    pub(crate) api_key: Option<&'a str>,
    /// `headers`.
    pub(crate) headers: &'a [String],
    /// `backend_idle_timeout_secs`.
    pub(crate) backend_idle_timeout_secs: Option<u64>,
    /// `backend_connect_timeout_secs`.
    pub(crate) backend_connect_timeout_secs: Option<u64>,
    /// `allow`.
    pub(crate) allow: &'a [String],
    /// `allow_defaults`.
    pub(crate) allow_defaults: Option<bool>,
}

/// The replay and answer-budget keys of a file (exit, serve).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GateFile {
    /// `max_clock_skew_secs`.
    pub(crate) max_clock_skew_secs: Option<u64>,
    /// `replay_cache_entries`.
    pub(crate) replay_cache_entries: Option<usize>,
    /// `answer_budget_bytes`.
    pub(crate) answer_budget_bytes: Option<usize>,
    /// `answer_budget_wait_secs`.
    pub(crate) answer_budget_wait_secs: Option<u64>,
}

/// Adds the exit's replay settings and answer budget to `limits`, flags over the file
/// (exit, serve).
pub(crate) fn with_gate(
    mut limits: Limits,
    args: &ExitGateArgs,
    file: &GateFile,
) -> Result<Limits, ConfigError> {
    match args.max_clock_skew_secs.or(file.max_clock_skew_secs) {
        None => {}
        Some(secs) if MAX_CLOCK_SKEW_SECS.contains(&secs) => {
            limits.max_clock_skew = Duration::from_secs(secs);
        }
        Some(_) => return Err(out_of("max_clock_skew", &MAX_CLOCK_SKEW_SECS, "seconds")),
    }
    match args.replay_cache_entries.or(file.replay_cache_entries) {
        None => {}
        Some(n) if REPLAY_CACHE_ENTRIES.contains(&n) => limits.replay_cache_entries = n,
        Some(_) => {
            return Err(out_of(
                "replay_cache_entries",
                &REPLAY_CACHE_ENTRIES,
                "(each costs about 100 bytes)",
            ));
        }
    }
    with_answer_budget(limits, args, file)
}

/// Adds the exit's answer budget (exit, serve): it must hold the largest answer.
fn with_answer_budget(
    mut limits: Limits,
    args: &ExitGateArgs,
    file: &GateFile,
) -> Result<Limits, ConfigError> {
    if let Some(bytes) = args.answer_budget_bytes.or(file.answer_budget_bytes) {
        limits.answer_budget = bytes;
    }
    let smallest = min_answer_budget(limits.max_response_body);
    if limits.answer_budget < smallest {
        return Err(invalid(
            "answer_budget_bytes",
            format!(
                "must be at least {smallest} to hold the largest answer \
                 (max_response_body_bytes {} plus the eighth kept for small answers); \
                 raise it or lower max_response_body_bytes",
                limits.max_response_body
            ),
        ));
    }
    limits.answer_budget_wait = config::seconds_within(
        "answer_budget_wait_secs",
        args.answer_budget_wait_secs
            .or(file.answer_budget_wait_secs),
        ANSWER_BUDGET_WAIT_SECS,
        limits.answer_budget_wait,
    )?;
    Ok(limits)
}

/// The smallest answer budget that holds an answer of `max_response_body` bytes, with a
/// MiB for its head, framing and padding, in the seven eighths large answers may use.
#[must_use]
pub fn min_answer_budget(max_response_body: usize) -> usize {
    max_response_body
        .saturating_add(1 << 20)
        .saturating_mul(8)
        .div_ceil(7)
}

/// Where and how the exit calls the AI backend.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Base URL; request paths are appended to it. Default [`DEFAULT_BACKEND`]
    /// (`http://localhost:11434`).
    pub url: reqwest::Url,
    /// Headers added to every backend request (including `Authorization` from `api_key`).
    /// Kept out of `Debug` output by [`RedactedHeaders`].
    pub headers: RedactedHeaders,
    /// Abandon a request after this long without a byte from the backend. Idle, not absolute:
    /// a long generation that keeps streaming is never cut. Default
    /// [`DEFAULT_BACKEND_IDLE_TIMEOUT`] (300 s: a large model may think that long before its
    /// first token).
    pub idle_timeout: Duration,
    /// Give up connecting after this long. Default [`DEFAULT_BACKEND_CONNECT_TIMEOUT`] (10 s).
    pub connect_timeout: Duration,
    /// The endpoints that reach the backend. Default: the inference endpoints of
    /// [`DEFAULT_ENDPOINTS`](crate::roles::exit::DEFAULT_ENDPOINTS).
    pub allow: EndpointPolicy,
}

/// A header map whose values never reach logs.
#[derive(Clone, Default)]
pub struct RedactedHeaders(pub HeaderMap);

impl std::fmt::Debug for RedactedHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl BackendConfig {
    /// The backend from its flags over the file's keys (exit, serve).
    pub(crate) fn resolve(
        args: BackendArgs,
        gate: &ExitGateArgs,
        file: &BackendFile<'_>,
    ) -> Result<Self, ConfigError> {
        let raw = args
            .backend
            .as_deref()
            .or(file.backend)
            .unwrap_or(DEFAULT_BACKEND);
        let url = parse_backend_url(raw)?;
        let mut headers = HeaderMap::new();
        for line in config::flags_or_file(&args.headers, file.headers) {
            let (name, value) = parse_header(line)?;
            headers.append(name, value);
        }
        if let Some(key) = args.api_key.as_deref().or(file.api_key) {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
                .map_err(|_| invalid("api_key", "contains characters not allowed in a header"))?;
            value.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, value);
        }
        let secs = |field, value: Option<u64>, default: Duration| match value {
            None => Ok(default),
            Some(0) => Err(invalid(field, "must be at least 1 second")),
            Some(s) => Ok(Duration::from_secs(s)),
        };
        Ok(Self {
            url,
            headers: RedactedHeaders(headers),
            idle_timeout: secs(
                "backend_idle_timeout_secs",
                file.backend_idle_timeout_secs,
                DEFAULT_BACKEND_IDLE_TIMEOUT,
            )?,
            connect_timeout: secs(
                "backend_connect_timeout_secs",
                file.backend_connect_timeout_secs,
                DEFAULT_BACKEND_CONNECT_TIMEOUT,
            )?,
            allow: endpoint_policy(gate, file)?,
        })
    }

    /// Whether the exit sends the backend anything that looks like a credential: an API key,
    /// or a header whose name says authorization, key, token, secret or cookie.
    #[must_use]
    pub fn holds_credentials(&self) -> bool {
        self.headers.0.keys().any(|name| {
            let name = name.as_str();
            ["auth", "key", "token", "secret", "cookie", "session"]
                .iter()
                .any(|word| name.contains(word))
        })
    }
}

/// The endpoints an exit passes to its backend: the defaults plus `allow`, or `allow` alone
/// when `allow_defaults` is false. Flags replace the file's list.
fn endpoint_policy(
    args: &ExitGateArgs,
    file: &BackendFile<'_>,
) -> Result<EndpointPolicy, ConfigError> {
    let rules = config::flags_or_file(&args.allow, file.allow)
        .iter()
        .map(|rule| {
            rule.parse::<EndpointRule>()
                .map_err(|e| invalid("allow", e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let defaults = args.allow_defaults.or(file.allow_defaults).unwrap_or(true);
    if !defaults && rules.is_empty() {
        return Err(invalid(
            "allow_defaults",
            "false with no `allow` rules would refuse every request; list the endpoints to serve",
        ));
    }
    Ok(EndpointPolicy::new(rules, !defaults))
}

fn parse_backend_url(raw: &str) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| {
        invalid(
            "backend",
            format!("`{raw}` is not a URL ({e}); expected e.g. http://localhost:11434"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            "backend",
            format!("`{raw}` must start with http:// or https://"),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("backend", "must not carry a query or fragment"));
    }
    Ok(url)
}

fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue), ConfigError> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| invalid("header", format!("`{line}` is not `Name: value`")))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
        invalid(
            "header",
            format!("`{}` is not a valid header name", name.trim()),
        )
    })?;
    let mut value = HeaderValue::from_str(value.trim()).map_err(|_| {
        invalid(
            "header",
            format!("value of `{name}` is not a valid header value"),
        )
    })?;
    value.set_sensitive(true);
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::{CommonArgs, RequestArgs},
        config::{
            examples,
            test_support::{assert_refused, common, file_with, relay_addr},
        },
        net::discovery::AddressPolicy,
    };

    /// An exit that needs no relay, reading `yaml`.
    fn public(yaml: &str, dir: &std::path::Path) -> Result<ExitConfig, ConfigError> {
        let file = file_with(yaml);
        ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir),
            public: true,
            ..ExitArgs::default()
        })
    }

    #[test]
    fn the_example_configs_load() {
        assert!(examples::check::<ExitFile>("exit") >= 2);
    }

    #[test]
    fn keys_of_other_roles_and_typos_are_refused_naming_the_key_and_the_command() {
        let dir = tempfile::tempdir().unwrap();
        assert_refused(
            |yaml| public(yaml, dir.path()),
            &[
                ("backnd: http://localhost:11434\n", "backnd"),
                ("listen: 127.0.0.1:8080\n", "listen"),
                ("exits: []\n", "exits"),
                ("forward_headers: [x-team]\n", "forward_headers"),
                ("max_exits: 10\n", "max_exits"),
                ("contended_streams: 4\n", "contended_streams"),
                ("exit_answer_timeout_secs: 20\n", "exit_answer_timeout_secs"),
            ],
            "tokengo exit",
            "relay, public",
        );
        let error = public("backnd: http://x\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("did you mean `backend`"), "{error}");
    }

    #[test]
    fn every_exit_key_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay_addr();
        let file = file_with(&format!(
            "relay: [{relay}]\npublic: true\naccess_token_file: /run/tokens\n\
             backend: http://127.0.0.1:1\napi_key: k\nheaders: ['X-Org: a']\n\
             backend_idle_timeout_secs: 9\nbackend_connect_timeout_secs: 8\n\
             allow: ['GET /api/ps']\nallow_defaults: true\nmax_clock_skew_secs: 30\n\
             replay_cache_entries: 10\nanswer_budget_bytes: 100000000\n\
             answer_budget_wait_secs: 3\nrequest_timeout_secs: 60\n\
             key_rotation_hours: 2\ndata_dir: /nonexistent\nworker_threads: 3\n\
             admin_listen: 127.0.0.1:9096\notlp_endpoint: http://127.0.0.1:4318\n\
             bootstrap: []\ndht_protocol: /ipfs/kad/1.0.0\naddress_policy: public\n\
             discovery_timeout_secs: 4\nfallback_relays: [{relay}]\nmax_relays: 2\n\
             dht_announce: false\ndht_listen: 127.0.0.1:4102\n\
             external_addrs: ['/ip4/203.0.113.9']\nmax_request_body_bytes: 1000\n\
             max_response_body_bytes: 8000000\nquic_idle_timeout_secs: 20\n\
             write_stall_timeout_secs: 7\ntunnel_liveness_secs: 4\n"
        ));
        let config = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            ..ExitArgs::default()
        })
        .unwrap();
        assert_eq!(config.relays.len(), 1);
        assert!(config.public);
        assert_eq!(config.max_relays, 2);
        assert_eq!(config.fallback_relays.len(), 1);
        assert!(config.announce.is_none());
        assert_eq!(config.dht.timeout, Duration::from_secs(4));
        assert_eq!(config.key_rotation, Some(Duration::from_secs(7200)));
        assert_eq!(config.worker_threads.get(), 3);
        assert_eq!(config.backend.idle_timeout, Duration::from_secs(9));
        assert_eq!(config.backend.connect_timeout, Duration::from_secs(8));
        let limits = &config.limits;
        assert_eq!(limits.max_request_body, 1000);
        assert_eq!(limits.max_response_body, 8_000_000);
        assert_eq!(limits.quic_idle_timeout, Duration::from_secs(20));
        assert_eq!(limits.write_stall_timeout, Duration::from_secs(7));
        assert_eq!(limits.tunnel_liveness, Duration::from_secs(4));
        assert_eq!(limits.request_timeout, Duration::from_secs(60));
        assert_eq!(limits.max_clock_skew, Duration::from_secs(30));
        assert_eq!(limits.replay_cache_entries, 10);
        assert_eq!(limits.answer_budget, 100_000_000);
        assert_eq!(limits.answer_budget_wait, Duration::from_secs(3));
    }

    #[test]
    fn exit_without_a_relay_is_refused_unless_public() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("");
        let args = ExitArgs {
            common: common(file.path(), dir.path()),
            ..ExitArgs::default()
        };
        let error = ExitConfig::resolve(args).unwrap_err().to_string();
        assert!(
            error.contains("--relay") && error.contains("--public"),
            "{error}"
        );
        let given = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            relays: vec![relay_addr()],
            ..ExitArgs::default()
        })
        .unwrap();
        assert_eq!(given.relays.len(), 1);
        assert!(!given.public, "private by default");
        assert!(given.access_token_file.is_none());
        let public = file_with("public: true\naccess_token_file: /run/tokens\n");
        let config = ExitConfig::resolve(ExitArgs {
            common: common(public.path(), dir.path()),
            ..ExitArgs::default()
        })
        .unwrap();
        assert!(config.public);
        assert_eq!(
            config.access_token_file.as_deref(),
            Some(std::path::Path::new("/run/tokens"))
        );
        let args = ExitArgs {
            common: common(file.path(), dir.path()),
            public: true,
            ..ExitArgs::default()
        };
        let config = ExitConfig::resolve(args).unwrap();
        assert!(config.relays.is_empty());
        assert_eq!(config.max_relays, DEFAULT_MAX_RELAYS);
        assert_eq!(config.dht.protocol.as_ref(), "/ipfs/kad/1.0.0");
        assert_eq!(config.dht.policy, AddressPolicy::Public);
        assert!(!config.dht.bootstrap.is_empty());
        assert_eq!(config.worker_threads, WorkerThreads::per_core());
    }

    #[test]
    fn a_keys_dir_is_taken_only_with_key_rotation_off() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay_addr();
        let resolve = |yaml: &str, keys_dir: Option<&str>, hours: Option<f64>| {
            let file = file_with(&format!("relay: {relay}\n{yaml}"));
            ExitConfig::resolve(ExitArgs {
                common: common(file.path(), dir.path()),
                keys: crate::cli::KeysDirArgs {
                    keys_dir: keys_dir.map(Into::into),
                },
                key_rotation_hours: hours,
                ..ExitArgs::default()
            })
        };
        let keys_dir = |config: &ExitConfig| {
            config
                .keys_dir
                .as_ref()
                .map(|dir| dir.display().to_string())
        };
        let none = resolve("", None, None).unwrap();
        assert_eq!(keys_dir(&none), None, "keys live in the data directory");
        let from_file =
            resolve("keys_dir: /keys/file\nkey_rotation_hours: 0\n", None, None).unwrap();
        assert_eq!(keys_dir(&from_file).as_deref(), Some("/keys/file"));
        assert_eq!(from_file.key_rotation, None);
        let flag_wins = resolve("keys_dir: /keys/file\n", Some("/keys/flag"), Some(0.0)).unwrap();
        assert_eq!(keys_dir(&flag_wins).as_deref(), Some("/keys/flag"));
        // Rotation on (the default, the file's, the flag's): the exit could not save its ring.
        for (yaml, hours) in [
            ("keys_dir: /keys/file\n", None),
            ("keys_dir: /keys/file\nkey_rotation_hours: 24\n", None),
            ("keys_dir: /keys/file\nkey_rotation_hours: 0\n", Some(1.0)),
        ] {
            let error = resolve(yaml, None, hours).unwrap_err().to_string();
            assert!(error.contains("invalid `keys_dir`"), "{yaml}: {error}");
            assert!(error.contains("/keys/file is read-only"), "{error}");
            assert!(error.contains("--key-rotation-hours 0"), "{error}");
        }
    }

    #[test]
    fn an_exit_takes_several_relays_and_a_fractional_key_rotation_period() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (relay_addr(), relay_addr());
        let resolve = |yaml: &str, relays: Vec<String>, hours: Option<f64>| {
            let file = file_with(yaml);
            ExitConfig::resolve(ExitArgs {
                common: common(file.path(), dir.path()),
                relays,
                key_rotation_hours: hours,
                ..ExitArgs::default()
            })
        };
        let flags = resolve("", vec![a.clone(), b.clone()], None).unwrap();
        assert_eq!(
            flags
                .relays
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec![a.clone(), b.clone()]
        );
        assert_eq!(
            flags.key_rotation,
            Some(Duration::from_secs(168 * 3600)),
            "a week by default"
        );
        let listed = resolve(
            &format!("relay: [{a}, {b}]\nkey_rotation_hours: 0.001\n"),
            Vec::new(),
            None,
        )
        .unwrap();
        assert_eq!(listed.relays.len(), 2);
        assert_eq!(listed.key_rotation, Some(Duration::from_millis(3600)));
        let off = resolve("key_rotation_hours: 0\n", vec![a.clone()], None).unwrap();
        assert_eq!(off.key_rotation, None);
        let flag_wins = resolve("key_rotation_hours: 0\n", vec![a.clone()], Some(2.0)).unwrap();
        assert_eq!(flag_wins.key_rotation, Some(Duration::from_secs(7200)));
        for hours in [-1.0, f64::NAN, f64::INFINITY, 0.0001, 1e9] {
            let error = resolve("", vec![a.clone()], Some(hours))
                .unwrap_err()
                .to_string();
            assert!(error.contains("key_rotation_hours"), "{hours}: {error}");
        }
        let error = resolve(
            "",
            vec![a.clone(), "/ip4/1.2.3.4/udp/1/quic-v1".into()],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("relay") && error.contains("/p2p/"),
            "{error}"
        );
        let many = (0..17).map(|_| relay_addr()).collect();
        let error = resolve("", many, None).unwrap_err().to_string();
        assert!(error.contains("at most 16"), "{error}");
    }

    #[test]
    fn only_public_exits_announce_by_default_or_when_told_to() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay_addr();
        let resolve = |yaml: &str, flag: Option<bool>, external: &[&str]| {
            let file = file_with(yaml);
            let args = ExitArgs {
                common: common(file.path(), dir.path()),
                public: !yaml.contains("private"),
                dht_announce: flag,
                external_addrs: external.iter().map(ToString::to_string).collect(),
                ..ExitArgs::default()
            };
            ExitConfig::resolve(args).map(|c| c.announce)
        };
        let discovering = resolve("", None, &[]).unwrap().unwrap();
        assert_eq!(discovering.listen, "0.0.0.0:4001".parse().unwrap());
        assert!(discovering.external_ips.is_empty());
        let pinned_relay = format!("relay: {relay}\n");
        assert!(
            resolve(&pinned_relay, None, &[]).unwrap().is_some(),
            "public"
        );
        let private = format!("{pinned_relay}# private\n");
        assert!(resolve(&private, None, &[]).unwrap().is_none());
        let error = resolve(&private, Some(true), &[]).unwrap_err().to_string();
        assert!(
            error.contains("dht_announce") && error.contains("--public"),
            "{error}"
        );
        let told = resolve(
            &format!("{pinned_relay}dht_announce: true\ndht_listen: 127.0.0.1:4102\n"),
            None,
            &["/ip4/203.0.113.9"],
        )
        .unwrap()
        .unwrap();
        assert_eq!(told.listen, "127.0.0.1:4102".parse().unwrap());
        assert_eq!(
            told.external_ips,
            vec!["203.0.113.9".parse::<IpAddr>().unwrap()]
        );
        assert!(
            resolve("dht_announce: true\n", Some(false), &[])
                .unwrap()
                .is_none()
        );
        let error = resolve("", None, &["nowhere"]).unwrap_err().to_string();
        assert!(error.contains("external_addrs"), "{error}");
    }

    #[test]
    fn bad_discovery_values_name_their_field() {
        let dir = tempfile::tempdir().unwrap();
        let peer = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        for (yaml, field) in [
            (
                "bootstrap: ['/ip4/127.0.0.1/udp/4001/quic-v1']\n".to_owned(),
                "bootstrap",
            ),
            ("dht_protocol: kad\n".to_owned(), "dht_protocol"),
            ("address_policy: lan\n".to_owned(), "address_policy"),
            (
                "dht_announce: true\nexternal_addrs: ['nowhere']\n".to_owned(),
                "external_addrs",
            ),
            ("max_relays: 0\n".to_owned(), "max_relays"),
            ("max_relays: 17\n".to_owned(), "max_relays"),
            (
                "fallback_relays: ['/ip4/127.0.0.1/udp/4001/quic-v1']\n".to_owned(),
                "fallback_relays",
            ),
            (
                "discovery_timeout_secs: 0\n".to_owned(),
                "discovery_timeout_secs",
            ),
            (
                format!("bootstrap: ['/ip4/10.0.0.5/udp/4001/quic-v1/p2p/{peer}']\n"),
                "bootstrap",
            ),
        ] {
            let error = public(&yaml, dir.path()).unwrap_err().to_string();
            assert!(error.contains(field), "{yaml} -> {error}");
        }
    }

    #[test]
    fn the_answer_budget_comes_from_file_then_flags_and_must_hold_the_largest_answer() {
        let dir = tempfile::tempdir().unwrap();
        let config = public("", dir.path()).unwrap();
        assert_eq!(config.limits.answer_budget, 256 << 20);
        assert_eq!(config.limits.answer_budget_wait, Duration::from_secs(10));
        assert!(config.limits.answer_budget >= min_answer_budget(config.limits.max_response_body));
        let file = file_with(
            "answer_budget_bytes: 100000000\nanswer_budget_wait_secs: 3\n\
             max_response_body_bytes: 8000000\n",
        );
        let config = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            public: true,
            ..ExitArgs::default()
        })
        .unwrap();
        assert_eq!(config.limits.answer_budget, 100_000_000);
        assert_eq!(config.limits.answer_budget_wait, Duration::from_secs(3));
        let config = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            gate: ExitGateArgs {
                answer_budget_bytes: Some(min_answer_budget(8_000_000)),
                answer_budget_wait_secs: Some(1),
                ..ExitGateArgs::default()
            },
            public: true,
            ..ExitArgs::default()
        })
        .unwrap();
        assert_eq!(config.limits.answer_budget, min_answer_budget(8_000_000));
        assert_eq!(config.limits.answer_budget_wait, Duration::from_secs(1));
        let error = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            gate: ExitGateArgs {
                answer_budget_bytes: Some(min_answer_budget(8_000_000) - 1),
                ..ExitGateArgs::default()
            },
            public: true,
            ..ExitArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("answer_budget_bytes") && error.contains("max_response_body_bytes"),
            "{error}"
        );
    }

    #[test]
    fn gate_flags_replace_the_file_and_allow_defaults_false_keeps_only_the_rules_given() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with(
            "allow: ['POST /api/pull']\nmax_clock_skew_secs: 30\nreplay_cache_entries: 10\n\
             request_timeout_secs: 3600\n",
        );
        let config = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            public: true,
            ..ExitArgs::default()
        })
        .unwrap();
        let rules: Vec<_> = config
            .backend
            .allow
            .rules()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(rules.len(), crate::roles::exit::DEFAULT_ENDPOINTS.len() + 1);
        assert_eq!(rules.last().unwrap(), "POST /api/pull");
        assert_eq!(config.limits.max_clock_skew, Duration::from_secs(30));
        assert_eq!(config.limits.replay_cache_entries, 10);
        assert_eq!(config.limits.request_timeout, Duration::from_secs(3600));
        let config = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            gate: ExitGateArgs {
                allow: vec!["GET /v1/models".into()],
                allow_defaults: Some(false),
                ..ExitGateArgs::default()
            },
            request: RequestArgs {
                request_timeout_secs: Some(60),
            },
            public: true,
            ..ExitArgs::default()
        })
        .unwrap();
        let rules: Vec<_> = config
            .backend
            .allow
            .rules()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(rules, ["GET /v1/models"]);
        assert_eq!(config.limits.request_timeout, Duration::from_secs(60));
    }

    #[test]
    fn api_key_becomes_a_sensitive_bearer_header() {
        let dir = tempfile::tempdir().unwrap();
        let config = public("api_key: sk-secret\nheaders: ['X-Org: acme']\n", dir.path()).unwrap();
        let auth = config.backend.headers.0.get("authorization").unwrap();
        assert_eq!(auth, "Bearer sk-secret");
        assert!(auth.is_sensitive());
        assert_eq!(config.backend.headers.0.get("x-org").unwrap(), "acme");
        assert!(!format!("{config:?}").contains("sk-secret"));
        assert!(config.backend.holds_credentials());
        let plain = public("headers: ['X-Org: acme']\n", dir.path()).unwrap();
        assert!(!plain.backend.holds_credentials());
        let keyed = public("headers: ['X-Api-Key: k', 'X-Org: acme']\n", dir.path()).unwrap();
        assert!(keyed.backend.holds_credentials());
    }

    #[test]
    fn the_worker_threads_flag_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("worker_threads: 3\npublic: true\n");
        let from_file = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            ..ExitArgs::default()
        })
        .unwrap();
        assert_eq!(from_file.worker_threads.get(), 3);
        let flagged = ExitConfig::resolve(ExitArgs {
            common: CommonArgs {
                worker_threads: Some(1),
                ..common(file.path(), dir.path())
            },
            ..ExitArgs::default()
        })
        .unwrap();
        assert_eq!(flagged.worker_threads.get(), 1);
    }
}
