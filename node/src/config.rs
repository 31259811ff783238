//! Configuration in two layers: raw inputs (flags, `TOKENGO_*` environment variables and a YAML
//! file, merged in that order of precedence) and the checked, typed configuration each role
//! runs with. Every error names the field that is wrong and what would be right.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    path::PathBuf,
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue};
use libp2p_identity::PeerId;
use serde::Deserialize;

use libp2p::{Multiaddr, StreamProtocol};

use crate::{
    cli::{
        BackendArgs, BootstrapArgs, ClientArgs, CommonArgs, DhtArgs, ExitArgs, ExitGateArgs,
        FallbackArgs, LocalEndpointArgs, RelayArgs, RequestArgs, ServeArgs,
    },
    net::discovery::{AddressPolicy, DEFAULT_DHT_PROTOCOL, DhtConfig},
    net::transport::RelayAddr,
    roles::access::{AccessToken, ExitTokens},
    roles::client::ClientPolicy,
    roles::exit::{EndpointPolicy, EndpointRule},
    store::data_dir::DataDir,
};

pub mod defaults;

// The re-export keeps `config::MAX_EXITS_CEILING` working for the relay and the tests.
pub use defaults::MAX_EXITS_CEILING;
use defaults::{
    ANSWER_BUDGET_WAIT_SECS, DEFAULT_BACKEND, DEFAULT_BACKEND_CONNECT_TIMEOUT,
    DEFAULT_BACKEND_IDLE_TIMEOUT, DEFAULT_CLIENT_LISTEN, DEFAULT_DHT_LISTEN,
    DEFAULT_KEY_ROTATION_HOURS, DEFAULT_OTLP_TIMEOUT, DEFAULT_RELAY_LISTEN, DISCOVERY_TIMEOUT_SECS,
    EXIT_ANSWER_TIMEOUT_SECS, MAX_CLOCK_SKEW_SECS, MAX_EXIT_RELAYS, MAX_KEY_ROTATION_HOURS,
    MAX_RELAYS, MAX_WORKER_THREADS, MIN_KEY_ROTATION, QUIC_IDLE_TIMEOUT_SECS, REPLAY_CACHE_ENTRIES,
    REQUEST_TIMEOUT_SECS, TUNNEL_LIVENESS_SECS, WRITE_STALL_TIMEOUT_SECS,
};

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The YAML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML file is not valid for TokenGo.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the field and line.
        message: String,
    },
    /// A field has a value that cannot be used.
    #[error("invalid `{field}`: {message}")]
    Invalid {
        /// The field (flag and YAML key share the name).
        field: &'static str,
        /// What is wrong and what would be right.
        message: String,
    },
    /// A required field is missing.
    #[error("missing `{field}`: {hint}")]
    Missing {
        /// The field.
        field: &'static str,
        /// How to provide it.
        hint: &'static str,
    },
    /// The data directory cannot be used.
    #[error(transparent)]
    DataDir(#[from] crate::store::data_dir::DataDirError),
}

/// `value` seconds when within `range`, `default` when absent; otherwise an error naming `field`.
fn seconds_within(
    field: &'static str,
    value: Option<u64>,
    range: std::ops::RangeInclusive<u64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(secs) if range.contains(&secs) => Ok(Duration::from_secs(secs)),
        Some(_) => Err(invalid(
            field,
            format!("must be {} to {} seconds", range.start(), range.end()),
        )),
    }
}

/// A rate per second: finite and not negative.
fn rate(field: &'static str, value: Option<f64>) -> Result<Option<f64>, ConfigError> {
    match value {
        Some(v) if !v.is_finite() || v < 0.0 => Err(invalid(
            field,
            "must be a number of at least 0 (0 turns the limit off)",
        )),
        other => Ok(other),
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// "must be START to END UNIT" for a value outside `range`.
fn out_of<T: std::fmt::Display>(
    field: &'static str,
    range: &std::ops::RangeInclusive<T>,
    unit: &str,
) -> ConfigError {
    let message = format!("must be {} to {}", range.start(), range.end());
    invalid(
        field,
        if unit.is_empty() {
            message
        } else {
            format!("{message} {unit}")
        },
    )
}

/// The YAML file: every key optional, unknown keys rejected so typos do not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    /// One relay, or a list of them (client and exit).
    relay: Option<OneOrMany>,
    /// Exit PeerIds a client is pinned to (`PEERID` or `PEERID=TOKEN`).
    #[serde(default)]
    exits: Vec<String>,
    /// A client's access token for exits that require one.
    exit_token: Option<String>,
    /// Whether an exit serves the public (DHT discovery of relays).
    public: Option<bool>,
    /// An exit's file of access tokens.
    access_token_file: Option<PathBuf>,
    backend: Option<String>,
    api_key: Option<String>,
    #[serde(default)]
    headers: Vec<String>,
    data_dir: Option<PathBuf>,
    /// Seconds without any byte from the backend before a request is abandoned.
    backend_idle_timeout_secs: Option<u64>,
    /// Seconds a backend connection may take to establish.
    backend_connect_timeout_secs: Option<u64>,
    /// Largest request body accepted, in bytes.
    max_request_body_bytes: Option<usize>,
    /// Largest non-streamed response body accepted, in bytes.
    max_response_body_bytes: Option<usize>,
    /// Seconds without any packet before a QUIC connection is considered dead.
    quic_idle_timeout_secs: Option<u64>,
    /// Seconds a write may wait for a reader that takes no bytes.
    write_stall_timeout_secs: Option<u64>,
    /// Seconds of silence after which an exit tunnel counts as dead.
    tunnel_liveness_secs: Option<u64>,
    /// Seconds an exit may take to start answering a request it has whole (relay).
    exit_answer_timeout_secs: Option<u64>,
    /// Lowest average rate of a request body at the relay, in bytes per second.
    min_request_body_rate: Option<u64>,
    /// Most exits a relay keeps registered.
    max_exits: Option<usize>,
    /// Streams in flight at one exit from which a relay shares them fairly by source.
    contended_streams: Option<usize>,
    /// New connections a relay accepts per source address and second (0: no limit).
    source_connections_per_sec: Option<f64>,
    /// New connections a relay accepts from one source address at once.
    source_connection_burst: Option<u32>,
    /// Admin endpoint address (off when absent).
    admin_listen: Option<String>,
    /// OTLP collector base URL for traces (off when absent, unless `OTEL_*` says otherwise).
    otlp_endpoint: Option<String>,
    /// DHT bootstrap peers (multiaddrs with /p2p/).
    #[serde(default)]
    bootstrap: Vec<String>,
    /// Kademlia protocol name.
    dht_protocol: Option<String>,
    /// Addresses discovery may dial: public, loopback, any.
    address_policy: Option<String>,
    /// Seconds discovery may take at start.
    discovery_timeout_secs: Option<u64>,
    /// Whether a relay or an exit announces itself on the DHT.
    dht_announce: Option<bool>,
    /// UDP address of the relay's or exit's DHT node.
    dht_listen: Option<String>,
    /// The node's public IPs (`/ip4/X`, `/ip6/X`).
    #[serde(default)]
    external_addrs: Vec<String>,
    /// Most discovered relays an exit registers with.
    max_relays: Option<usize>,
    /// Hours between an exit's OHTTP key rotations (0: off).
    key_rotation_hours: Option<f64>,
    /// Relays used when discovery and the cache yield none.
    #[serde(default)]
    fallback_relays: Vec<String>,
    /// Threads that run the role's tasks.
    worker_threads: Option<usize>,
    /// Seconds a request may wait for its answer to begin.
    request_timeout_secs: Option<u64>,
    /// Endpoints passed to the backend besides (or instead of) the defaults.
    #[serde(default)]
    allow: Vec<String>,
    /// Whether the default endpoints pass too.
    allow_defaults: Option<bool>,
    /// Largest accepted distance between a request's Date and the exit's clock.
    max_clock_skew_secs: Option<u64>,
    /// Most recent requests remembered against replay.
    replay_cache_entries: Option<usize>,
    /// Most bytes of single-message answers an exit holds at once.
    answer_budget_bytes: Option<usize>,
    /// Seconds an answer may wait for the answer budget before a 503.
    answer_budget_wait_secs: Option<u64>,
    /// Request headers the client forwards besides the defaults.
    #[serde(default)]
    forward_headers: Vec<String>,
    /// Host names the client answers besides loopback ones.
    #[serde(default)]
    allowed_hosts: Vec<String>,
    /// Web origins the client answers besides loopback ones.
    #[serde(default)]
    allowed_origins: Vec<String>,
}

/// A YAML value that may be one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

impl FileConfig {
    fn load(path: Option<&PathBuf>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })
    }
}

/// Timeouts and size limits shared by the roles.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body the client accepts and the exit decodes. Default 32 MiB.
    pub max_request_body: usize,
    /// Largest non-streamed (single-message) response body. Default 64 MiB.
    pub max_response_body: usize,
    /// QUIC idle timeout; keep-alives are sent at a third of it. Default 30 s.
    pub quic_idle_timeout: Duration,
    /// Longest a request may wait for its answer to begin: the exit's wait for the backend's
    /// response head (which a non-streaming backend sends only when generation ends), and,
    /// with a margin, the client's wait for the exit. Default 30 minutes.
    pub request_timeout: Duration,
    /// The exit refuses requests whose `Date` is further than this from its clock. Default 60 s.
    pub max_clock_skew: Duration,
    /// Most recent requests (their `enc`) the exit remembers against replay; when full it
    /// refuses new requests rather than forget one early. Default 2,097,152 (about 80 MiB when
    /// full, 40 bytes each; 17,000 requests a second sustained with the default skew, above
    /// what one exit decapsulates on two cores: a flood of valid requests must not fill it and
    /// shut everyone out).
    pub replay_cache_entries: usize,
    /// How long a write may wait for a reader that takes no bytes (relay to client and to
    /// exit, exit to relay) before the stream is reset, so a client that stops reading cannot
    /// pin a stream and the backend connection behind it. Idle, not absolute: a slow reader
    /// that keeps reading is never cut. Default 30 s.
    pub write_stall_timeout: Duration,
    /// How long the relay waits for an exit's tunnel to take a new stream before it answers
    /// `ExitUnavailable`. Default 10 s.
    pub stream_open_timeout: Duration,
    /// Silence after which an exit's tunnel counts as dead. The exit asks for it as the
    /// tunnel's QUIC idle timeout (QUIC takes the lower of the two ends' values, so the relay
    /// applies it too) and sends keep-alives at a third of it: a crashed exit leaves the
    /// relay's list and its streams fail within it, and an exit notices a lost relay within
    /// it. Three keep-alive packets per tunnel every two seconds at the default, against
    /// which a relay's 1000 tunnels cost little; client connections keep `quic_idle_timeout`.
    /// Default 2 s (1 to 60): a request in flight at an exit that crashes then ends within
    /// about 2.5 s (the fault suite's bound is 3 s), and three keep-alives in a row must be
    /// lost for a live tunnel to count as dead.
    pub tunnel_liveness: Duration,
    /// How long an exit may take, once the relay has sent it a whole request, to send the
    /// first byte of its answer: version 2 exits send `ACCEPTED` right before they call their
    /// backend, so only a wedged exit misses it. Then the relay resets the exit's stream and
    /// answers `ExitUnavailable`, and the client tries another exit. Requests in version 1
    /// (the first byte comes with the backend's answer) are not bounded. Default 10 s
    /// (1 to 600).
    pub exit_answer_timeout: Duration,
    /// A request body must reach the relay at this average rate (bytes per second, counted
    /// from the stream's start) once `request_body_grace` has passed, or the stream is
    /// reset: trickling bytes cannot hold an exit's slot. Default 16 KiB/s.
    pub min_request_body_rate: u64,
    /// Time a request body may take before its rate counts. Default 10 s.
    pub request_body_grace: Duration,
    /// Most exits one relay keeps registered; its exit list must always fit what clients
    /// accept (1024 entries, 4 MiB), so the byte budget of the descriptors is fixed at
    /// `relay::registry::MAX_LIST_BYTES`. Default 1000, at most 1000.
    pub max_exits: usize,
    /// Registrations of new exit identities a relay accepts: a burst, then a steady rate
    /// per second. Default 256, then 16/s.
    pub registration_burst: u32,
    /// See `registration_burst`.
    pub registrations_per_sec: u32,
    /// Handshakes in progress above which the relay asks new clients to prove their address
    /// first (QUIC Retry), so spoofed sources cannot make it hold handshake state.
    /// Default 64.
    pub retry_above_handshakes: usize,
    /// Most bytes of single-message (non-streamed) answers the exit holds at once, all
    /// requests together. Such an answer is one AEAD seal, so it is held whole until the relay
    /// has taken it, and a client that stops reading keeps it held until the write stall
    /// timeout: without a bound, clients that never read could make an exit hold any amount.
    /// Bytes beyond an answer's first 256 KiB may use only seven eighths of it, so large
    /// answers never starve small ones. Streamed (chunked) answers are not buffered and do
    /// not count. Default 256 MiB: three of the largest answers (`max_response_body`), or
    /// about 56 stalled 4 MiB answers; at least eight sevenths of `max_response_body` plus
    /// 1 MiB.
    pub answer_budget: usize,
    /// How long one answer may wait in all for the answer budget (the backend's body is not
    /// read meanwhile) before the user gets an encrypted 503 `exit_overloaded` and the bytes
    /// it collected are given back. Default 10 s.
    pub answer_budget_wait: Duration,
    /// Streams in flight at one exit from which the relay shares that exit fairly among
    /// client source addresses (IPv4 address, IPv6 /64) active there in the last second:
    /// each then keeps at most its part of this many (at least 4) in flight and its further
    /// requests wait for its own to finish (at most 5 s, then `Overloaded`). A source alone
    /// at an exit is never limited by it; 0 shares only a full exit. Default 16.
    pub contended_streams: usize,
    /// New QUIC connections the relay accepts per source address and second, after a burst
    /// of `source_connection_burst`; beyond it, an unproven address is asked for a QUIC
    /// Retry and a proven one refused before the handshake (proven and unproven attempts
    /// are counted apart, so spoofed packets cannot spend another's; an address that
    /// answers Retries gets up to twice this). 0 turns the limit off. Default 8.
    pub source_connections_per_sec: f64,
    /// See `source_connections_per_sec`. Default 64.
    pub source_connection_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_body: defaults::DEFAULT_MAX_REQUEST_BODY,
            max_response_body: defaults::DEFAULT_MAX_RESPONSE_BODY,
            quic_idle_timeout: defaults::DEFAULT_QUIC_IDLE_TIMEOUT,
            request_timeout: defaults::DEFAULT_REQUEST_TIMEOUT,
            max_clock_skew: defaults::DEFAULT_MAX_CLOCK_SKEW,
            replay_cache_entries: defaults::DEFAULT_REPLAY_CACHE_ENTRIES,
            write_stall_timeout: defaults::DEFAULT_WRITE_STALL_TIMEOUT,
            stream_open_timeout: defaults::STREAM_OPEN_TIMEOUT,
            tunnel_liveness: defaults::DEFAULT_TUNNEL_LIVENESS,
            exit_answer_timeout: defaults::DEFAULT_EXIT_ANSWER_TIMEOUT,
            min_request_body_rate: defaults::DEFAULT_MIN_REQUEST_BODY_RATE,
            request_body_grace: defaults::REQUEST_BODY_GRACE,
            max_exits: MAX_EXITS_CEILING,
            registration_burst: defaults::NEW_EXIT_REGISTRATION_BURST,
            registrations_per_sec: defaults::NEW_EXIT_REGISTRATIONS_PER_SEC,
            retry_above_handshakes: defaults::RETRY_ABOVE_HANDSHAKES,
            answer_budget: defaults::DEFAULT_ANSWER_BUDGET,
            answer_budget_wait: defaults::DEFAULT_ANSWER_BUDGET_WAIT,
            contended_streams: defaults::DEFAULT_CONTENDED_STREAMS,
            source_connections_per_sec: defaults::DEFAULT_SOURCE_CONNECTIONS_PER_SEC,
            source_connection_burst: defaults::DEFAULT_SOURCE_CONNECTION_BURST,
        }
    }
}

impl Limits {
    /// The relay's admission flags over what the file said.
    fn with_admission(self, args: &crate::cli::AdmissionArgs) -> Result<Self, ConfigError> {
        if args.source_connection_burst == Some(0) {
            return Err(invalid(
                "source_connection_burst",
                "must be at least 1 (turn the limit off with --source-connections-per-sec 0)",
            ));
        }
        Ok(Self {
            contended_streams: args.contended_streams.unwrap_or(self.contended_streams),
            source_connections_per_sec: rate(
                "source_connections_per_sec",
                args.source_connections_per_sec,
            )?
            .unwrap_or(self.source_connections_per_sec),
            source_connection_burst: args
                .source_connection_burst
                .unwrap_or(self.source_connection_burst),
            ..self
        })
    }

    fn from_file(file: &FileConfig) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let quic_idle_timeout = seconds_within(
            "quic_idle_timeout_secs",
            file.quic_idle_timeout_secs,
            QUIC_IDLE_TIMEOUT_SECS,
            defaults.quic_idle_timeout,
        )?;
        let write_stall_timeout = seconds_within(
            "write_stall_timeout_secs",
            file.write_stall_timeout_secs,
            WRITE_STALL_TIMEOUT_SECS,
            defaults.write_stall_timeout,
        )?;
        let tunnel_liveness = seconds_within(
            "tunnel_liveness_secs",
            file.tunnel_liveness_secs,
            TUNNEL_LIVENESS_SECS,
            defaults.tunnel_liveness,
        )?;
        let exit_answer_timeout = seconds_within(
            "exit_answer_timeout_secs",
            file.exit_answer_timeout_secs,
            EXIT_ANSWER_TIMEOUT_SECS,
            defaults.exit_answer_timeout,
        )?;
        let max_exits = match file.max_exits {
            None => defaults.max_exits,
            Some(n @ 1..=MAX_EXITS_CEILING) => n,
            Some(_) => {
                return Err(invalid(
                    "max_exits",
                    format!(
                        "must be 1 to {MAX_EXITS_CEILING} (clients accept lists of at most 1024 exits)"
                    ),
                ));
            }
        };
        let min_request_body_rate = match file.min_request_body_rate {
            None => defaults.min_request_body_rate,
            Some(0) => {
                return Err(invalid(
                    "min_request_body_rate",
                    "must be at least 1 byte per second",
                ));
            }
            Some(rate) => rate,
        };
        let source_connection_burst = match file.source_connection_burst {
            None => defaults.source_connection_burst,
            Some(0) => {
                return Err(invalid(
                    "source_connection_burst",
                    "must be at least 1 (turn the limit off with source_connections_per_sec: 0)",
                ));
            }
            Some(burst) => burst,
        };
        let source_connections_per_sec = rate(
            "source_connections_per_sec",
            file.source_connections_per_sec,
        )?
        .unwrap_or(defaults.source_connections_per_sec);
        Ok(Self {
            source_connections_per_sec,
            contended_streams: file.contended_streams.unwrap_or(defaults.contended_streams),
            source_connection_burst,
            max_request_body: positive("max_request_body_bytes", file.max_request_body_bytes)?
                .unwrap_or(defaults.max_request_body),
            max_response_body: positive("max_response_body_bytes", file.max_response_body_bytes)?
                .unwrap_or(defaults.max_response_body),
            quic_idle_timeout,
            write_stall_timeout,
            tunnel_liveness,
            exit_answer_timeout,
            min_request_body_rate,
            max_exits,
            ..defaults
        })
    }

    /// Adds the liveness flags, which win over the file (relay, exit).
    fn with_liveness(mut self, args: &crate::cli::LivenessArgs) -> Result<Self, ConfigError> {
        if let Some(secs) = args.tunnel_liveness_secs {
            self.tunnel_liveness = seconds_within(
                "tunnel_liveness",
                Some(secs),
                TUNNEL_LIVENESS_SECS,
                self.tunnel_liveness,
            )?;
        }
        if let Some(secs) = args.exit_answer_timeout_secs {
            self.exit_answer_timeout = seconds_within(
                "exit_answer_timeout",
                Some(secs),
                EXIT_ANSWER_TIMEOUT_SECS,
                self.exit_answer_timeout,
            )?;
        }
        Ok(self)
    }

    /// Adds the request timeout (client, exit, serve).
    fn with_request(mut self, args: &RequestArgs, file: &FileConfig) -> Result<Self, ConfigError> {
        match args.request_timeout_secs.or(file.request_timeout_secs) {
            None => {}
            Some(secs) if REQUEST_TIMEOUT_SECS.contains(&secs) => {
                self.request_timeout = Duration::from_secs(secs);
            }
            Some(_) => return Err(out_of("request_timeout", &REQUEST_TIMEOUT_SECS, "seconds")),
        }
        Ok(self)
    }

    /// Adds the exit's replay settings (exit, serve).
    fn with_gate(mut self, args: &ExitGateArgs, file: &FileConfig) -> Result<Self, ConfigError> {
        match args.max_clock_skew_secs.or(file.max_clock_skew_secs) {
            None => {}
            Some(secs) if MAX_CLOCK_SKEW_SECS.contains(&secs) => {
                self.max_clock_skew = Duration::from_secs(secs);
            }
            Some(_) => return Err(out_of("max_clock_skew", &MAX_CLOCK_SKEW_SECS, "seconds")),
        }
        match args.replay_cache_entries.or(file.replay_cache_entries) {
            None => {}
            Some(n) if REPLAY_CACHE_ENTRIES.contains(&n) => self.replay_cache_entries = n,
            Some(_) => {
                return Err(out_of(
                    "replay_cache_entries",
                    &REPLAY_CACHE_ENTRIES,
                    "(each costs about 100 bytes)",
                ));
            }
        }
        self.with_answer_budget(args, file)
    }

    /// Adds the exit's answer budget (exit, serve): it must hold the largest answer.
    fn with_answer_budget(
        mut self,
        args: &ExitGateArgs,
        file: &FileConfig,
    ) -> Result<Self, ConfigError> {
        if let Some(bytes) = args.answer_budget_bytes.or(file.answer_budget_bytes) {
            self.answer_budget = bytes;
        }
        let smallest = min_answer_budget(self.max_response_body);
        if self.answer_budget < smallest {
            return Err(invalid(
                "answer_budget_bytes",
                format!(
                    "must be at least {smallest} to hold the largest answer \
                     (max_response_body_bytes {} plus the eighth kept for small answers); \
                     raise it or lower max_response_body_bytes",
                    self.max_response_body
                ),
            ));
        }
        self.answer_budget_wait = seconds_within(
            "answer_budget_wait_secs",
            args.answer_budget_wait_secs
                .or(file.answer_budget_wait_secs),
            ANSWER_BUDGET_WAIT_SECS,
            self.answer_budget_wait,
        )?;
        Ok(self)
    }
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

/// The endpoints an exit passes to its backend: the defaults plus `allow`, or `allow` alone
/// when `allow_defaults` is false. Flags replace the file's list.
fn endpoint_policy(args: &ExitGateArgs, file: &FileConfig) -> Result<EndpointPolicy, ConfigError> {
    let raw = if args.allow.is_empty() {
        &file.allow
    } else {
        &args.allow
    };
    let rules = raw
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

/// What the local endpoint answers and forwards. Flags replace the file's lists.
fn client_policy(args: &LocalEndpointArgs, file: &FileConfig) -> Result<ClientPolicy, ConfigError> {
    let pick = |flag: &Vec<String>, yaml: &Vec<String>| {
        if flag.is_empty() {
            yaml.clone()
        } else {
            flag.clone()
        }
    };
    let forward_headers = pick(&args.forward_headers, &file.forward_headers)
        .iter()
        .map(|name| {
            let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                invalid("forward_headers", format!("`{name}` is not a header name"))
            })?;
            if crate::web::http_message::is_hop_by_hop(&name)
                || crate::web::http_message::is_credential(&name)
                || name == http::header::USER_AGENT
            {
                return Err(invalid(
                    "forward_headers",
                    format!("`{name}` is never forwarded (hop-by-hop, a credential or User-Agent)"),
                ));
            }
            Ok(name)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let lower = |list: Vec<String>, field: &'static str| {
        list.into_iter()
            .map(|v| {
                let v = v.trim().trim_end_matches('/').to_ascii_lowercase();
                if v.is_empty() {
                    Err(invalid(field, "empty entry"))
                } else {
                    Ok(v)
                }
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(ClientPolicy {
        forward_headers,
        allowed_hosts: lower(
            pick(&args.allowed_hosts, &file.allowed_hosts),
            "allowed_hosts",
        )?,
        allowed_origins: lower(
            pick(&args.allowed_origins, &file.allowed_origins),
            "allowed_origins",
        )?,
    })
}

/// How many threads run a role's async tasks. Default: one per CPU core the process may use.
///
/// A role's own work per request is tens of microseconds, so one thread carries thousands of
/// requests a second, and on a host that many processes share (all roles on one small
/// machine) one thread each is faster: every extra thread costs cross-thread wake-ups at low
/// load. README "Performance" has the measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerThreads(NonZeroUsize);

impl WorkerThreads {
    /// One thread.
    pub const ONE: Self = Self(NonZeroUsize::MIN);

    /// One per CPU core the process may use (cgroup limits included), at least one.
    #[must_use]
    pub fn per_core() -> Self {
        Self(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
    }

    /// The count.
    #[must_use]
    pub fn get(self) -> usize {
        self.0.get()
    }

    fn resolve(common: &CommonArgs, file: &FileConfig) -> Result<Self, ConfigError> {
        match common
            .worker_threads
            .or(file.worker_threads)
            .map(NonZeroUsize::new)
        {
            None => Ok(Self::per_core()),
            Some(Some(n)) if n.get() <= MAX_WORKER_THREADS => Ok(Self(n)),
            Some(_) => Err(invalid(
                "worker_threads",
                format!("must be 1 to {MAX_WORKER_THREADS}"),
            )),
        }
    }
}

fn positive(field: &'static str, value: Option<usize>) -> Result<Option<usize>, ConfigError> {
    match value {
        Some(0) => Err(invalid(field, "must be greater than zero")),
        other => Ok(other),
    }
}

/// Where and how the exit calls the AI backend.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Base URL; request paths are appended to it.
    pub url: reqwest::Url,
    /// Headers added to every backend request (including `Authorization` from `api_key`).
    /// Kept out of `Debug` output by [`RedactedHeaders`].
    pub headers: RedactedHeaders,
    /// Abandon a request after this long without a byte from the backend. Idle, not absolute:
    /// a long generation that keeps streaming is never cut. Default 300 s (a large model may
    /// think that long before its first token).
    pub idle_timeout: Duration,
    /// Give up connecting after this long. Default 10 s.
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
    fn resolve(
        args: BackendArgs,
        gate: &ExitGateArgs,
        file: &FileConfig,
    ) -> Result<Self, ConfigError> {
        let raw = args
            .backend
            .or_else(|| file.backend.clone())
            .unwrap_or_else(|| DEFAULT_BACKEND.to_owned());
        let url = parse_backend_url(&raw)?;
        let mut headers = HeaderMap::new();
        let header_lines = if args.headers.is_empty() {
            file.headers.clone()
        } else {
            args.headers
        };
        for line in &header_lines {
            let (name, value) = parse_header(line)?;
            headers.append(name, value);
        }
        if let Some(key) = args.api_key.or_else(|| file.api_key.clone()) {
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
}

impl BackendConfig {
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

fn parse_listen(field: &'static str, raw: &str) -> Result<SocketAddr, ConfigError> {
    raw.trim().parse().map_err(|_| {
        invalid(
            field,
            format!("`{raw}` is not an IP:port address, e.g. 127.0.0.1:8080"),
        )
    })
}

/// A client's or an exit's relays: flags (or `TOKENGO_RELAY`) win over the file's `relay`
/// (one or a list).
fn client_relays(args: &[String], file: &FileConfig) -> Result<Vec<RelayAddr>, ConfigError> {
    let raw = if args.is_empty() {
        file.relay
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
    } else {
        args.to_vec()
    };
    raw.iter()
        .map(|r| {
            r.trim()
                .parse()
                .map_err(|e: crate::net::transport::AddrError| invalid("relay", e.to_string()))
        })
        .collect()
}

/// A client's pinned exits and their access tokens: flags (or `TOKENGO_EXITS`) win over the
/// file's `exits`; each is `PEERID` or `PEERID=TOKEN`.
fn pinned_exits(
    args: &[String],
    file: &FileConfig,
) -> Result<(Vec<PeerId>, HashMap<PeerId, AccessToken>), ConfigError> {
    let raw = if args.is_empty() { &file.exits } else { args };
    let mut exits: Vec<PeerId> = Vec::with_capacity(raw.len());
    let mut tokens = HashMap::new();
    for entry in raw {
        let (text, token) = match entry.split_once('=') {
            Some((peer, token)) => (peer, Some(token)),
            None => (entry.as_str(), None),
        };
        let peer = text.trim().parse().map_err(|_| {
            invalid(
                "exits",
                format!(
                    "`{text}` is not an exit PeerId (12D3KooW...; an exit prints it at start, and `kubectl get tokengoexit NAME -o jsonpath='{{.status.peerId}}'` shows an operator's)"
                ),
            )
        })?;
        if let Some(token) = token {
            let token = AccessToken::parse(token)
                .map_err(|e| invalid("exits", format!("the token of {peer}: {e}")))?;
            tokens.insert(peer, token);
        }
        if !exits.contains(&peer) {
            exits.push(peer);
        }
    }
    Ok((exits, tokens))
}

/// Relays to fall back on when discovery finds none: flags win over the file.
fn fallback_relays(args: &FallbackArgs, file: &FileConfig) -> Result<Vec<RelayAddr>, ConfigError> {
    let raw = if args.fallback_relays.is_empty() {
        &file.fallback_relays
    } else {
        &args.fallback_relays
    };
    raw.iter()
        .map(|r| {
            r.trim()
                .parse()
                .map_err(|e: crate::net::transport::AddrError| {
                    invalid("fallback_relays", e.to_string())
                })
        })
        .collect()
}

/// The DHT to join: flags win over the file; no bootstrap peers given means the public IPFS
/// DHT with the `public` address policy; given ones with a protocol name of their own mean a
/// private network (policy `any` unless set). Given ones on the public protocol name keep
/// `public`: they are entry points into the public DHT, whose records must not steer dials
/// into the local network.
fn dht_config(args: &DhtArgs, file: &FileConfig) -> Result<DhtConfig, ConfigError> {
    let mut config = DhtConfig::public();
    let raw = if args.bootstrap.is_empty() {
        &file.bootstrap
    } else {
        &args.bootstrap
    };
    if !raw.is_empty() {
        config.bootstrap = raw
            .iter()
            .map(|a| parse_bootstrap(a))
            .collect::<Result<_, _>>()?;
    }
    if let Some(name) = args.dht_protocol.as_ref().or(file.dht_protocol.as_ref()) {
        let name = name.trim();
        if !name.starts_with('/') {
            return Err(invalid(
                "dht_protocol",
                format!("`{name}` must start with `/`, e.g. /ipfs/kad/1.0.0 or /mynet/kad/1.0.0"),
            ));
        }
        config.protocol = StreamProtocol::try_from_owned(name.to_owned())
            .map_err(|e| invalid("dht_protocol", e.to_string()))?;
    }
    let private = !raw.is_empty() && config.protocol.as_ref() != DEFAULT_DHT_PROTOCOL;
    if private {
        config.policy = AddressPolicy::Any;
    }
    if let Some(policy) = args
        .address_policy
        .as_ref()
        .or(file.address_policy.as_ref())
    {
        config.policy = policy
            .parse()
            .map_err(|e: String| invalid("address_policy", e))?;
    } else if let Some(refused) = config
        .bootstrap
        .iter()
        .find(|a| crate::net::discovery::policy::ip_of(a).is_some() && !config.policy.allows(a))
    {
        return Err(invalid(
            "bootstrap",
            format!(
                "`{refused}` is not a public address, and on the public DHT protocol name ({DEFAULT_DHT_PROTOCOL}) only public addresses are dialled; a private network names its own protocol (--dht-protocol /mynet/kad/1.0.0), or set --address-policy any"
            ),
        ));
    }
    config.timeout = match file.discovery_timeout_secs {
        None => crate::net::discovery::DEFAULT_DISCOVERY_TIMEOUT,
        Some(secs) if DISCOVERY_TIMEOUT_SECS.contains(&secs) => Duration::from_secs(secs),
        Some(_) => {
            return Err(out_of(
                "discovery_timeout_secs",
                &DISCOVERY_TIMEOUT_SECS,
                "seconds",
            ));
        }
    };
    Ok(config)
}

fn parse_bootstrap(raw: &str) -> Result<Multiaddr, ConfigError> {
    let addr: Multiaddr = raw.trim().parse().map_err(|_| {
        invalid(
            "bootstrap",
            format!("`{raw}` is not a multiaddr; expected /ip4/HOST/udp/4001/quic-v1/p2p/PEERID"),
        )
    })?;
    if !matches!(
        addr.iter().last(),
        Some(libp2p::multiaddr::Protocol::P2p(_))
    ) {
        return Err(invalid(
            "bootstrap",
            format!("`{raw}` has no /p2p/PEERID (`tokengo bootstrap` prints its full address)"),
        ));
    }
    Ok(addr)
}

/// External addresses as IPs: `/ip4/X`, `/ip6/X` (anything after the IP is ignored: the
/// ports are the node's own) or a bare IP.
fn parse_external(raw: &[String]) -> Result<Vec<IpAddr>, ConfigError> {
    raw.iter()
        .map(|a| {
            let a = a.trim();
            if let Ok(ip) = a.parse::<IpAddr>() {
                return Ok(ip);
            }
            a.parse::<Multiaddr>()
                .ok()
                .and_then(|m| crate::net::discovery::policy::ip_of(&m))
                .filter(|ip| !ip.is_unspecified())
                .ok_or_else(|| {
                    invalid(
                        "external_addrs",
                        format!("`{a}` is not /ip4/IP or /ip6/IP (the node's public address)"),
                    )
                })
        })
        .collect()
}

fn dht_listen(raw: Option<&str>) -> Result<SocketAddr, ConfigError> {
    parse_listen("dht_listen", raw.unwrap_or(DEFAULT_DHT_LISTEN))
}

/// The standard OpenTelemetry environment variables that decide whether and how traces are
/// exported (raw input; the exporter and SDK read the rest, such as headers, sampler and
/// resource attributes, themselves).
#[derive(Debug, Clone, Default)]
pub struct OtelEnv {
    /// `OTEL_SDK_DISABLED`.
    pub sdk_disabled: Option<String>,
    /// `OTEL_TRACES_EXPORTER`.
    pub traces_exporter: Option<String>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`.
    pub traces_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub protocol: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`.
    pub traces_protocol: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds).
    pub timeout: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` (milliseconds).
    pub traces_timeout: Option<String>,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`.
    pub resource_attributes: Option<String>,
}

impl OtelEnv {
    /// Reads the variables from this process's environment (empty values count as unset,
    /// as the specification says).
    #[must_use]
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self {
            sdk_disabled: var("OTEL_SDK_DISABLED"),
            traces_exporter: var("OTEL_TRACES_EXPORTER"),
            endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT"),
            traces_endpoint: var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            protocol: var("OTEL_EXPORTER_OTLP_PROTOCOL"),
            traces_protocol: var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            timeout: var("OTEL_EXPORTER_OTLP_TIMEOUT"),
            traces_timeout: var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
            service_name: var("OTEL_SERVICE_NAME"),
            resource_attributes: var("OTEL_RESOURCE_ATTRIBUTES"),
        }
    }
}

/// Whether and where traces are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceExport {
    /// No export (the default).
    Off,
    /// OTLP over HTTP/protobuf.
    Otlp {
        /// Full URL of the traces endpoint from `--otlp-endpoint` (its base URL with
        /// `/v1/traces` appended); `None` lets the exporter read
        /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` (default
        /// `http://localhost:4318/v1/traces`).
        endpoint: Option<String>,
        /// Time one export request may take. Default 10 s (`OTEL_EXPORTER_OTLP_TIMEOUT`).
        timeout: Duration,
        /// `service.name` to use when `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
        /// name none: `tokengo-<role>`.
        service_name: Option<String>,
    },
}

/// The admin endpoint and trace export of a long-running role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservabilityConfig {
    /// Address of the admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`).
    /// Default: off. Loopback is expected; Kubernetes probes need the pod's address.
    pub admin_listen: Option<SocketAddr>,
    /// Trace export. Default: off.
    pub traces: TraceExport,
}

impl ObservabilityConfig {
    /// Checks the admin address and decides trace export for `role` from the flag or file
    /// (`otlp_endpoint`) and the `OTEL_*` variables: `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none` turn export off whatever else is set; otherwise an
    /// endpoint from either source (or `OTEL_TRACES_EXPORTER=otlp`) turns it on.
    pub fn resolve(
        common: &CommonArgs,
        file_admin: Option<&str>,
        file_otlp: Option<&str>,
        env: &OtelEnv,
        role: &'static str,
    ) -> Result<Self, ConfigError> {
        let admin_listen = common
            .admin_listen
            .as_deref()
            .or(file_admin)
            .map(|raw| parse_listen("admin_listen", raw))
            .transpose()?;
        let endpoint = common
            .otlp_endpoint
            .as_deref()
            .or(file_otlp)
            .map(traces_url)
            .transpose()?;
        Ok(Self {
            admin_listen,
            traces: trace_export(endpoint, env, role)?,
        })
    }
}

fn traces_url(raw: &str) -> Result<String, ConfigError> {
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| {
        invalid(
            "otlp_endpoint",
            format!("`{raw}` is not a URL ({e}); expected e.g. http://127.0.0.1:4318"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            "otlp_endpoint",
            format!("`{raw}` must be an http:// or https:// URL of an OTLP/HTTP collector"),
        ));
    }
    // The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: the signal's path is appended.
    Ok(format!("{}/v1/traces", url.as_str().trim_end_matches('/')))
}

fn trace_export(
    endpoint: Option<String>,
    env: &OtelEnv,
    role: &'static str,
) -> Result<TraceExport, ConfigError> {
    if env
        .sdk_disabled
        .as_deref()
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        return Ok(TraceExport::Off);
    }
    let exporters: Vec<String> = env
        .traces_exporter
        .as_deref()
        .map(|v| {
            v.split(',')
                .map(|e| e.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    if exporters.iter().any(|e| e == "none") {
        return Ok(TraceExport::Off);
    }
    if let Some(other) = exporters.iter().find(|e| e.as_str() != "otlp") {
        return Err(invalid(
            "OTEL_TRACES_EXPORTER",
            format!("`{other}` is not supported; only `otlp` (or `none`)"),
        ));
    }
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", &env.traces_protocol),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", &env.protocol),
    ] {
        if let Some(value) = value.as_deref()
            && value.trim() != "http/protobuf"
        {
            return Err(invalid(
                name,
                format!("`{value}` is not supported; tokengo exports OTLP as http/protobuf"),
            ));
        }
    }
    let wanted = endpoint.is_some()
        || env.endpoint.is_some()
        || env.traces_endpoint.is_some()
        || !exporters.is_empty();
    if !wanted {
        return Ok(TraceExport::Off);
    }
    let timeout = match env.traces_timeout.as_deref().or(env.timeout.as_deref()) {
        None => DEFAULT_OTLP_TIMEOUT,
        Some(raw) => match raw.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                return Err(invalid(
                    "OTEL_EXPORTER_OTLP_TIMEOUT",
                    format!("`{raw}` is not a positive number of milliseconds"),
                ));
            }
        },
    };
    let named = env.service_name.is_some()
        || env.resource_attributes.as_deref().is_some_and(|attrs| {
            attrs
                .split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    Ok(TraceExport::Otlp {
        endpoint,
        timeout,
        service_name: (!named).then(|| format!("tokengo-{role}")),
    })
}

fn observability(
    common: &CommonArgs,
    file: &FileConfig,
    role: &'static str,
) -> Result<ObservabilityConfig, ConfigError> {
    ObservabilityConfig::resolve(
        common,
        file.admin_listen.as_deref(),
        file.otlp_endpoint.as_deref(),
        &OtelEnv::from_process(),
        role,
    )
}

fn data_dir(common: &CommonArgs, file: &FileConfig) -> Result<DataDir, ConfigError> {
    let explicit = common.data_dir.clone().or_else(|| file.data_dir.clone());
    Ok(DataDir::resolve(explicit)?)
}

/// Checked configuration of `tokengo relay`.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// UDP address for QUIC. Default `0.0.0.0:4433`.
    pub listen: SocketAddr,
    /// Where the relay's identity key lives.
    pub data_dir: DataDir,
    /// Timeouts and sizes.
    pub limits: Limits,
    /// Admin endpoint and trace export.
    pub observability: ObservabilityConfig,
    /// DHT announcement; `None` (the default) means the relay does not announce.
    pub dht: Option<RelayDhtConfig>,
    /// Threads that run its tasks. Default: one per CPU core.
    pub worker_threads: WorkerThreads,
}

/// How a relay announces itself on the DHT.
#[derive(Debug, Clone)]
pub struct RelayDhtConfig {
    /// The DHT.
    pub config: DhtConfig,
    /// UDP address of the relay's libp2p swarm (not the QUIC port). Default `0.0.0.0:4001`.
    pub listen: SocketAddr,
    /// The relay's confirmed public IPs. Default none: then the relay is announced only
    /// under the `loopback` policy (single-host networks) and otherwise reported as invisible.
    pub external_ips: Vec<IpAddr>,
}

impl RelayConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: RelayArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.common.config.as_ref())?;
        let listen = args.listen.clone().or_else(|| file.listen.clone());
        let announce = args.dht_announce || file.dht_announce.unwrap_or(false);
        let dht = if announce {
            let external = if args.external_addrs.is_empty() {
                &file.external_addrs
            } else {
                &args.external_addrs
            };
            Some(RelayDhtConfig {
                config: dht_config(&args.dht, &file)?,
                listen: dht_listen(args.dht_listen.as_deref().or(file.dht_listen.as_deref()))?,
                external_ips: parse_external(external)?,
            })
        } else {
            None
        };
        Ok(Self {
            listen: parse_listen("listen", listen.as_deref().unwrap_or(DEFAULT_RELAY_LISTEN))?,
            data_dir: data_dir(&args.common, &file)?,
            limits: Limits::from_file(&file)?
                .with_admission(&args.admission)?
                .with_liveness(&args.liveness)?,
            observability: observability(&args.common, &file, "relay")?,
            dht,
            worker_threads: WorkerThreads::resolve(&args.common, &file)?,
        })
    }
}

/// Checked configuration of `tokengo bootstrap`.
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    /// The DHT (its bootstrap peers are the other servers of the private network).
    pub dht: DhtConfig,
    /// UDP address of the DHT server. Default `0.0.0.0:4001`.
    pub listen: SocketAddr,
    /// Its public IPs.
    pub external_ips: Vec<IpAddr>,
    /// Where its identity lives (`bootstrap_identity.key`).
    pub data_dir: DataDir,
    /// Threads that run its tasks. Default: one per CPU core.
    pub worker_threads: WorkerThreads,
}

impl BootstrapConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: BootstrapArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.common.config.as_ref())?;
        let mut dht = dht_config(&args.dht, &file)?;
        // A bootstrap node without peers is the first of a private network, never a member
        // of the public DHT.
        if args.dht.bootstrap.is_empty() && file.bootstrap.is_empty() {
            dht.bootstrap.clear();
            if args.dht.address_policy.is_none() && file.address_policy.is_none() {
                dht.policy = AddressPolicy::Any;
            }
        }
        let listen = args.listen.or_else(|| file.listen.clone());
        let external = if args.external_addrs.is_empty() {
            &file.external_addrs
        } else {
            &args.external_addrs
        };
        Ok(Self {
            dht,
            listen: dht_listen(listen.as_deref())?,
            external_ips: parse_external(external)?,
            data_dir: data_dir(&args.common, &file)?,
            worker_threads: WorkerThreads::resolve(&args.common, &file)?,
        })
    }
}

/// The key rotation period from hours (`None` when 0: off). A fraction of an hour is allowed
/// down to one second, so tests and the fault suite can rotate every few seconds.
fn key_rotation(hours: Option<f64>) -> Result<Option<Duration>, ConfigError> {
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

/// Checked configuration of `tokengo exit`.
#[derive(Debug, Clone)]
pub struct ExitConfig {
    /// The relays to register with, one tunnel each, all kept in one process; empty
    /// discovers relays on the DHT, which only a public exit does. At most 16.
    pub relays: Vec<RelayAddr>,
    /// Time between OHTTP key rotations; `None` when rotation is off. Default 168 hours.
    /// The previous key is accepted for [`crate::store::keyring::overlap`] after each rotation.
    pub key_rotation: Option<Duration>,
    /// Whether the exit serves the public: it may discover relays on the DHT, and anyone who
    /// finds it may use it. Default false: the exit serves only through the relay it was
    /// given, and one with neither is refused at start.
    pub public: bool,
    /// File of group access tokens requests must carry. Default none: no token needed.
    pub access_token_file: Option<PathBuf>,
    /// The DHT to discover relays on when no relay is given.
    pub dht: DhtConfig,
    /// Most discovered relays to register with. Default 3.
    pub max_relays: usize,
    /// Relays registered with when the DHT and the cache yield none. Default none.
    pub fallback_relays: Vec<RelayAddr>,
    /// DHT announcement of the exit (on `dht`). Default: on for a public exit, off otherwise;
    /// `dht_announce` may turn it off, and on only for a public exit (announcing lets anyone
    /// find it).
    pub announce: Option<ExitAnnounceConfig>,
    /// The AI backend.
    pub backend: BackendConfig,
    /// Where the identity and OHTTP keys live.
    pub data_dir: DataDir,
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
        let file = FileConfig::load(args.common.config.as_ref())?;
        let max_relays = match args.max_relays.or(file.max_relays) {
            None => crate::net::discovery::DEFAULT_MAX_RELAYS,
            Some(n) if MAX_RELAYS.contains(&n) => n,
            Some(_) => return Err(out_of("max_relays", &MAX_RELAYS, "")),
        };
        let relays = client_relays(&args.relays, &file)?;
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
        // Announcing lets anyone find the exit: only a public exit does, and by default.
        let announce = args.dht_announce.or(file.dht_announce).unwrap_or(public);
        if announce && !public {
            return Err(invalid(
                "dht_announce",
                "announcing on the DHT lets anyone find and use this exit: add --public (TOKENGO_PUBLIC=true, YAML public: true), or leave announcing off",
            ));
        }
        let announce = if announce {
            let external = if args.external_addrs.is_empty() {
                &file.external_addrs
            } else {
                &args.external_addrs
            };
            Some(ExitAnnounceConfig {
                listen: dht_listen(args.dht_listen.as_deref().or(file.dht_listen.as_deref()))?,
                external_ips: parse_external(external)?,
            })
        } else {
            None
        };
        Ok(Self {
            relays,
            key_rotation,
            public,
            access_token_file: args
                .access_token_file
                .or_else(|| file.access_token_file.clone()),
            dht: dht_config(&args.dht, &file)?,
            fallback_relays: fallback_relays(&args.fallback, &file)?,
            announce,
            max_relays,
            backend: BackendConfig::resolve(args.backend, &args.gate, &file)?,
            data_dir: data_dir(&args.common, &file)?,
            limits: Limits::from_file(&file)?
                .with_request(&args.request, &file)?
                .with_gate(&args.gate, &file)?
                .with_liveness(&args.liveness)?,
            observability: observability(&args.common, &file, "exit")?,
            worker_threads: WorkerThreads::resolve(&args.common, &file)?,
        })
    }
}

/// How an exit announces itself on the DHT.
#[derive(Debug, Clone)]
pub struct ExitAnnounceConfig {
    /// UDP address of the exit's libp2p swarm. Default `0.0.0.0:4001`.
    pub listen: SocketAddr,
    /// The exit's confirmed public IPs. Default none: then the exit is announced only under
    /// the `loopback` policy and otherwise reported as not announced (`no_external_address`);
    /// clients then know it only from the lists of the relays it registers with.
    pub external_ips: Vec<IpAddr>,
}

/// Checked configuration of `tokengo client`.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The relays to send requests through (each request takes one that lists its exit).
    /// Default none: relays are discovered on the DHT.
    pub relays: Vec<RelayAddr>,
    /// The only exits requests may go to. Default none: any exit, chosen at random among the
    /// corroborated ones.
    pub exits: Vec<PeerId>,
    /// Access tokens for exits that require one. Default none: such exits are skipped
    /// (a pinned one answers 401).
    pub exit_tokens: ExitTokens,
    /// The DHT to discover relays on when no relay is given.
    pub dht: DhtConfig,
    /// Relays used when the DHT and the cache yield none. Default none.
    pub fallback_relays: Vec<RelayAddr>,
    /// Where the relay cache (`relays.json`) lives.
    pub data_dir: DataDir,
    /// Local HTTP endpoint. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Which local requests are answered and which headers forwarded. Default: loopback
    /// hosts and origins, the default header list.
    pub policy: ClientPolicy,
    /// Timeouts and sizes.
    pub limits: Limits,
    /// Admin endpoint and trace export.
    pub observability: ObservabilityConfig,
    /// Threads that run its tasks. Default: one per CPU core.
    pub worker_threads: WorkerThreads,
}

impl ClientConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: ClientArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.common.config.as_ref())?;
        let listen = args.listen.or_else(|| file.listen.clone());
        let (exits, per_exit) = pinned_exits(&args.exits, &file)?;
        let default = args
            .exit_token
            .or_else(|| file.exit_token.clone())
            .map(|t| AccessToken::parse(&t).map_err(|e| invalid("exit_token", e.to_string())))
            .transpose()?;
        Ok(Self {
            relays: client_relays(&args.relays, &file)?,
            exits,
            exit_tokens: ExitTokens { default, per_exit },
            dht: dht_config(&args.dht, &file)?,
            fallback_relays: fallback_relays(&args.fallback, &file)?,
            data_dir: data_dir(&args.common, &file)?,
            listen: parse_listen("listen", listen.as_deref().unwrap_or(DEFAULT_CLIENT_LISTEN))?,
            policy: client_policy(&args.local, &file)?,
            limits: Limits::from_file(&file)?.with_request(&args.request, &file)?,
            observability: observability(&args.common, &file, "client")?,
            worker_threads: WorkerThreads::resolve(&args.common, &file)?,
        })
    }
}

/// Checked configuration of `tokengo serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Local HTTP endpoint. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Which local requests are answered and which headers forwarded.
    pub policy: ClientPolicy,
    /// The AI backend.
    pub backend: BackendConfig,
    /// Where the relay and exit keys live.
    pub data_dir: DataDir,
    /// Time between the exit's OHTTP key rotations; `None` when off. Default 168 hours.
    pub key_rotation: Option<Duration>,
    /// Timeouts and sizes.
    pub limits: Limits,
    /// One admin endpoint for all three roles, and trace export.
    pub observability: ObservabilityConfig,
    /// Threads that run its tasks. Default: one per CPU core.
    pub worker_threads: WorkerThreads,
}

impl ServeConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = FileConfig::load(args.common.config.as_ref())?;
        let listen = args.listen.or_else(|| file.listen.clone());
        Ok(Self {
            listen: parse_listen("listen", listen.as_deref().unwrap_or(DEFAULT_CLIENT_LISTEN))?,
            policy: client_policy(&args.local, &file)?,
            backend: BackendConfig::resolve(args.backend, &args.gate, &file)?,
            data_dir: data_dir(&args.common, &file)?,
            key_rotation: key_rotation(args.key_rotation_hours.or(file.key_rotation_hours))?,
            limits: Limits::from_file(&file)?
                .with_request(&args.request, &file)?
                .with_gate(&args.gate, &file)?,
            observability: observability(&args.common, &file, "serve")?,
            worker_threads: WorkerThreads::resolve(&args.common, &file)?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    fn common(path: &std::path::Path, dir: &std::path::Path) -> CommonArgs {
        CommonArgs {
            config: Some(path.to_path_buf()),
            data_dir: Some(dir.to_path_buf()),
            ..CommonArgs::default()
        }
    }

    #[test]
    fn admin_and_traces_are_off_by_default_and_the_flag_wins_over_the_file() {
        let env = OtelEnv::default();
        let off = ObservabilityConfig::resolve(&CommonArgs::default(), None, None, &env, "relay")
            .unwrap();
        assert_eq!(off.admin_listen, None);
        assert_eq!(off.traces, TraceExport::Off);
        let flags = CommonArgs {
            admin_listen: Some("127.0.0.1:9091".into()),
            otlp_endpoint: Some("http://127.0.0.1:4318/".into()),
            ..CommonArgs::default()
        };
        let on = ObservabilityConfig::resolve(
            &flags,
            Some("127.0.0.1:9000"),
            Some("http://file:1"),
            &env,
            "exit",
        )
        .unwrap();
        assert_eq!(on.admin_listen, Some("127.0.0.1:9091".parse().unwrap()));
        assert_eq!(
            on.traces,
            TraceExport::Otlp {
                endpoint: Some("http://127.0.0.1:4318/v1/traces".into()),
                timeout: DEFAULT_OTLP_TIMEOUT,
                service_name: Some("tokengo-exit".into()),
            }
        );
        let error = ObservabilityConfig::resolve(
            &CommonArgs::default(),
            Some("localhost"),
            None,
            &env,
            "exit",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("admin_listen"), "{error}");
    }

    #[test]
    fn worker_threads_default_per_core_and_the_flag_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = file_with("");
        let relay = RelayConfig::resolve(RelayArgs {
            common: common(empty.path(), dir.path()),
            ..RelayArgs::default()
        })
        .unwrap();
        assert_eq!(relay.worker_threads, WorkerThreads::per_core());
        let client = ClientConfig::resolve(ClientArgs {
            common: common(empty.path(), dir.path()),
            ..ClientArgs::default()
        })
        .unwrap();
        assert_eq!(client.worker_threads, WorkerThreads::per_core());

        let file = file_with("worker_threads: 3\npublic: true\n");
        let exit = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            ..ExitArgs::default()
        })
        .unwrap();
        assert_eq!(exit.worker_threads.get(), 3);
        let relay = RelayConfig::resolve(RelayArgs {
            common: CommonArgs {
                worker_threads: Some(2),
                ..common(file.path(), dir.path())
            },
            ..RelayArgs::default()
        })
        .unwrap();
        assert_eq!(relay.worker_threads.get(), 2);
    }

    #[test]
    fn worker_threads_out_of_range_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["worker_threads: 0\n", "worker_threads: 5000\n"] {
            let file = file_with(text);
            let error = ServeConfig::resolve(ServeArgs {
                common: common(file.path(), dir.path()),
                ..ServeArgs::default()
            })
            .unwrap_err()
            .to_string();
            assert!(
                error.contains("worker_threads") && error.contains("1 to 1024"),
                "{error}"
            );
        }
        let error = BootstrapConfig::resolve(BootstrapArgs {
            common: CommonArgs {
                worker_threads: Some(0),
                ..CommonArgs::default()
            },
            ..BootstrapArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("worker_threads"), "{error}");
    }

    #[test]
    fn observability_keys_are_read_from_the_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file =
            file_with("admin_listen: 127.0.0.1:9095\notlp_endpoint: http://127.0.0.1:4318\n");
        let args = RelayArgs {
            common: common(file.path(), dir.path()),
            ..RelayArgs::default()
        };
        let config = RelayConfig::resolve(args).unwrap();
        assert_eq!(
            config.observability.admin_listen,
            Some("127.0.0.1:9095".parse().unwrap())
        );
        let file = file_with("otlp_endpoint: collector:4318\n");
        let args = RelayArgs {
            common: common(file.path(), dir.path()),
            ..RelayArgs::default()
        };
        let error = RelayConfig::resolve(args).unwrap_err().to_string();
        assert!(error.contains("otlp_endpoint"), "{error}");
    }

    #[test]
    fn otel_environment_turns_traces_on_and_off() {
        let none = CommonArgs::default();
        let resolve = |env: &OtelEnv| {
            ObservabilityConfig::resolve(&none, None, None, env, "client").map(|c| c.traces)
        };
        let on = OtelEnv {
            endpoint: Some("http://127.0.0.1:4318".into()),
            service_name: Some("mine".into()),
            timeout: Some("2500".into()),
            ..OtelEnv::default()
        };
        assert_eq!(
            resolve(&on).unwrap(),
            TraceExport::Otlp {
                endpoint: None,
                timeout: Duration::from_millis(2500),
                service_name: None,
            }
        );
        let disabled = OtelEnv {
            sdk_disabled: Some("TRUE".into()),
            ..on.clone()
        };
        assert_eq!(resolve(&disabled).unwrap(), TraceExport::Off);
        let exporter_none = OtelEnv {
            traces_exporter: Some("none".into()),
            ..on.clone()
        };
        assert_eq!(resolve(&exporter_none).unwrap(), TraceExport::Off);
        let grpc = OtelEnv {
            protocol: Some("grpc".into()),
            ..on.clone()
        };
        let error = resolve(&grpc).unwrap_err().to_string();
        assert!(error.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{error}");
        let zipkin = OtelEnv {
            traces_exporter: Some("zipkin".into()),
            ..OtelEnv::default()
        };
        assert!(resolve(&zipkin).is_err());
        let named_by_attributes = OtelEnv {
            traces_endpoint: Some("http://127.0.0.1:4318/v1/traces".into()),
            resource_attributes: Some("deployment.environment=test, service.name=x".into()),
            ..OtelEnv::default()
        };
        assert!(matches!(
            resolve(&named_by_attributes).unwrap(),
            TraceExport::Otlp {
                service_name: None,
                ..
            }
        ));
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("backend: http://file:1\nlisten: 127.0.0.1:9000\n");
        let args = ServeArgs {
            common: common(file.path(), dir.path()),
            backend: BackendArgs {
                backend: Some("http://flag:2".into()),
                ..BackendArgs::default()
            },
            ..ServeArgs::default()
        };
        let config = ServeConfig::resolve(args).unwrap();
        assert_eq!(config.backend.url.as_str(), "http://flag:2/");
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.backend.idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("backnd: http://x\n");
        let args = RelayArgs {
            common: common(file.path(), dir.path()),
            ..RelayArgs::default()
        };
        let error = RelayConfig::resolve(args).unwrap_err().to_string();
        assert!(error.contains("backnd"), "{error}");
    }

    #[test]
    fn liveness_defaults_come_from_the_file_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let defaults = Limits::default();
        assert_eq!(defaults.tunnel_liveness, Duration::from_secs(2));
        assert_eq!(defaults.exit_answer_timeout, Duration::from_secs(10));
        let file = file_with("tunnel_liveness_secs: 5\nexit_answer_timeout_secs: 20\n");
        let args = RelayArgs {
            common: common(file.path(), dir.path()),
            ..RelayArgs::default()
        };
        let limits = RelayConfig::resolve(args.clone()).unwrap().limits;
        assert_eq!(limits.tunnel_liveness, Duration::from_secs(5));
        assert_eq!(limits.exit_answer_timeout, Duration::from_secs(20));
        let flagged = RelayArgs {
            liveness: crate::cli::LivenessArgs {
                tunnel_liveness_secs: Some(2),
                exit_answer_timeout_secs: None,
            },
            ..args
        };
        let limits = RelayConfig::resolve(flagged.clone()).unwrap().limits;
        assert_eq!(limits.tunnel_liveness, Duration::from_secs(2));
        assert_eq!(limits.exit_answer_timeout, Duration::from_secs(20));
        let bad = RelayArgs {
            liveness: crate::cli::LivenessArgs {
                tunnel_liveness_secs: Some(0),
                exit_answer_timeout_secs: None,
            },
            ..flagged
        };
        let error = RelayConfig::resolve(bad).unwrap_err().to_string();
        assert!(error.contains("tunnel_liveness"), "{error}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("backend: ftp://x\n", "backend"),
            ("listen: localhost\n", "listen"),
            ("headers: ['no colon']\n", "header"),
            ("quic_idle_timeout_secs: 1\n", "quic_idle_timeout_secs"),
            ("max_request_body_bytes: 0\n", "max_request_body_bytes"),
            ("allow: ['DELETE']\n", "allow"),
            ("allow: ['POST /v1/../admin']\n", "allow"),
            ("allow_defaults: false\n", "allow_defaults"),
            ("max_clock_skew_secs: 0\n", "max_clock_skew"),
            ("replay_cache_entries: 0\n", "replay_cache_entries"),
            ("request_timeout_secs: 0\n", "request_timeout"),
            ("forward_headers: [authorization]\n", "forward_headers"),
            ("forward_headers: [user-agent]\n", "forward_headers"),
            ("allowed_hosts: ['']\n", "allowed_hosts"),
            ("write_stall_timeout_secs: 0\n", "write_stall_timeout_secs"),
            ("min_request_body_rate: 0\n", "min_request_body_rate"),
            ("max_exits: 1025\n", "max_exits"),
            ("answer_budget_bytes: 1048576\n", "answer_budget_bytes"),
            (
                "max_response_body_bytes: 1073741824\n",
                "answer_budget_bytes",
            ),
            ("answer_budget_wait_secs: 0\n", "answer_budget_wait_secs"),
            ("tunnel_liveness_secs: 0\n", "tunnel_liveness_secs"),
            ("tunnel_liveness_secs: 61\n", "tunnel_liveness_secs"),
            ("exit_answer_timeout_secs: 0\n", "exit_answer_timeout_secs"),
        ];
        for (yaml, field) in cases {
            let file = file_with(yaml);
            let args = ServeArgs {
                common: common(file.path(), dir.path()),
                ..ServeArgs::default()
            };
            let error = ServeConfig::resolve(args).unwrap_err().to_string();
            assert!(error.contains(field), "{yaml} -> {error}");
        }
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
        let relay = format!(
            "/ip4/127.0.0.1/udp/4433/quic-v1/p2p/{}",
            libp2p_identity::Keypair::generate_ed25519()
                .public()
                .to_peer_id()
        );
        let given = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            relays: vec![relay.clone()],
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
        assert_eq!(config.max_relays, crate::net::discovery::DEFAULT_MAX_RELAYS);
        assert_eq!(config.dht.protocol.as_ref(), "/ipfs/kad/1.0.0");
        assert_eq!(config.dht.policy, AddressPolicy::Public);
        assert!(!config.dht.bootstrap.is_empty());
    }

    #[test]
    fn an_exit_takes_several_relays_and_a_fractional_key_rotation_period() {
        let dir = tempfile::tempdir().unwrap();
        let relay = || {
            format!(
                "/ip4/127.0.0.1/udp/4433/quic-v1/p2p/{}",
                libp2p_identity::Keypair::generate_ed25519()
                    .public()
                    .to_peer_id()
            )
        };
        let (a, b) = (relay(), relay());
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
        let many = (0..17).map(|_| relay()).collect();
        let error = resolve("", many, None).unwrap_err().to_string();
        assert!(error.contains("at most 16"), "{error}");
    }

    #[test]
    fn only_public_exits_announce_by_default_or_when_told_to() {
        let dir = tempfile::tempdir().unwrap();
        let relay = format!(
            "/ip4/127.0.0.1/udp/4433/quic-v1/p2p/{}",
            libp2p_identity::Keypair::generate_ed25519()
                .public()
                .to_peer_id()
        );
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
    fn private_dht_settings_come_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let peer = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let file = file_with(&format!(
            "bootstrap: ['/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{peer}']\ndht_protocol: /mynet/kad/1.0.0\ndht_announce: true\nexternal_addrs: ['/ip4/203.0.113.7']\ndht_listen: 127.0.0.1:4101\n"
        ));
        let args = RelayArgs {
            common: common(file.path(), dir.path()),
            ..RelayArgs::default()
        };
        let config = RelayConfig::resolve(args).unwrap().dht.unwrap();
        assert_eq!(config.config.bootstrap.len(), 1);
        assert_eq!(config.config.protocol.as_ref(), "/mynet/kad/1.0.0");
        assert_eq!(config.config.policy, AddressPolicy::Any);
        assert_eq!(
            config.external_ips,
            vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(config.listen, "127.0.0.1:4101".parse().unwrap());
        let args = ClientArgs {
            common: common(file.path(), dir.path()),
            dht: DhtArgs {
                address_policy: Some("loopback".into()),
                ..DhtArgs::default()
            },
            ..ClientArgs::default()
        };
        assert_eq!(
            ClientConfig::resolve(args).unwrap().dht.policy,
            AddressPolicy::Loopback
        );
        for (yaml, field) in [
            (
                "bootstrap: ['/ip4/127.0.0.1/udp/4001/quic-v1']\n",
                "bootstrap",
            ),
            ("dht_protocol: kad\n", "dht_protocol"),
            ("address_policy: lan\n", "address_policy"),
            (
                "dht_announce: true\nexternal_addrs: ['nowhere']\n",
                "external_addrs",
            ),
            ("max_relays: 0\n", "max_relays"),
        ] {
            let file = file_with(yaml);
            let args = ExitArgs {
                common: common(file.path(), dir.path()),
                public: true,
                ..ExitArgs::default()
            };
            let relay_args = RelayArgs {
                common: common(file.path(), dir.path()),
                ..RelayArgs::default()
            };
            let error = match ExitConfig::resolve(args) {
                Err(e) => e.to_string(),
                Ok(_) => RelayConfig::resolve(relay_args).unwrap_err().to_string(),
            };
            assert!(error.contains(field), "{yaml} -> {error}");
        }
    }

    #[test]
    fn bootstrap_peers_on_the_public_protocol_name_keep_the_public_policy() {
        let dir = tempfile::tempdir().unwrap();
        let peer = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let client = |bootstrap: &str, protocol: Option<&str>, policy: Option<&str>| {
            let file = file_with("");
            ClientConfig::resolve(ClientArgs {
                common: common(file.path(), dir.path()),
                dht: DhtArgs {
                    bootstrap: vec![format!("{bootstrap}/udp/4001/quic-v1/p2p/{peer}")],
                    dht_protocol: protocol.map(str::to_owned),
                    address_policy: policy.map(str::to_owned),
                },
                ..ClientArgs::default()
            })
            .map(|c| c.dht.policy)
        };
        // Own entry points into the public DHT: its records still must not steer dials
        // into the local network.
        assert_eq!(
            client("/ip4/104.131.131.82", None, None).unwrap(),
            AddressPolicy::Public
        );
        // A private network names its own protocol.
        assert_eq!(
            client("/ip4/10.0.0.5", Some("/mynet/kad/1.0.0"), None).unwrap(),
            AddressPolicy::Any
        );
        // A LAN peer on the public name would be refused at every dial: said at start.
        let error = client("/ip4/10.0.0.5", None, None).unwrap_err().to_string();
        assert!(
            error.contains("--dht-protocol") && error.contains("--address-policy any"),
            "{error}"
        );
        assert_eq!(
            client("/ip4/10.0.0.5", None, Some("any")).unwrap(),
            AddressPolicy::Any
        );
    }

    #[test]
    fn client_relays_and_pinned_exits_from_flags_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let peer = |n: u8| {
            libp2p_identity::Keypair::ed25519_from_bytes([n; 32])
                .unwrap()
                .public()
                .to_peer_id()
        };
        let relay = |n: u8| format!("/ip4/127.0.0.1/udp/44{n:02}/quic-v1/p2p/{}", peer(n));
        let file = file_with(&format!(
            "relay: ['{}', '{}']\nexits: ['{}', '{}', '{}']\n",
            relay(1),
            relay(2),
            peer(3),
            peer(4),
            peer(3)
        ));
        let config = ClientConfig::resolve(ClientArgs {
            common: common(file.path(), dir.path()),
            ..ClientArgs::default()
        })
        .unwrap();
        assert_eq!(config.relays.len(), 2);
        assert_eq!(config.exits, vec![peer(3), peer(4)]);
        let config = ClientConfig::resolve(ClientArgs {
            common: common(file.path(), dir.path()),
            relays: vec![relay(5)],
            exits: vec![peer(6).to_string()],
            ..ClientArgs::default()
        })
        .unwrap();
        assert_eq!(config.relays[0].peer_id(), peer(5));
        assert_eq!(config.exits, vec![peer(6)]);
        // One relay as a plain string still works, for the client and the exit.
        let one = file_with(&format!("relay: {}\n", relay(7)));
        let config = ClientConfig::resolve(ClientArgs {
            common: common(one.path(), dir.path()),
            ..ClientArgs::default()
        })
        .unwrap();
        assert_eq!(config.relays[0].peer_id(), peer(7));
        let exit = ExitConfig::resolve(ExitArgs {
            common: common(file.path(), dir.path()),
            ..ExitArgs::default()
        })
        .unwrap();
        // An exit takes several relays now (one tunnel each), from the same file.
        assert_eq!(exit.relays.len(), 2);
        let bad = ClientConfig::resolve(ClientArgs {
            common: common(one.path(), dir.path()),
            exits: vec!["not-a-peer".into()],
            ..ClientArgs::default()
        })
        .unwrap_err();
        assert!(bad.to_string().contains("exits"), "{bad}");
        assert!(bad.to_string().contains("tokengoexit"), "{bad}");
    }

    #[test]
    fn client_exit_tokens_per_pinned_exit_and_for_any() {
        let dir = tempfile::tempdir().unwrap();
        let peer = |n: u8| {
            libp2p_identity::Keypair::ed25519_from_bytes([n; 32])
                .unwrap()
                .public()
                .to_peer_id()
        };
        let file = file_with(&format!(
            "relay: /ip4/127.0.0.1/udp/4401/quic-v1/p2p/{}\nexits: ['{}=pinned-token-0123456789', '{}']\nexit_token: default-token-0123456789\n",
            peer(1),
            peer(2),
            peer(3)
        ));
        let config = ClientConfig::resolve(ClientArgs {
            common: common(file.path(), dir.path()),
            ..ClientArgs::default()
        })
        .unwrap();
        assert_eq!(config.exits, vec![peer(2), peer(3)]);
        let token = |n| {
            config
                .exit_tokens
                .for_exit(&peer(n))
                .map(|t| t.as_bytes().to_vec())
        };
        assert_eq!(token(2).unwrap(), b"pinned-token-0123456789");
        assert_eq!(token(3).unwrap(), b"default-token-0123456789");
        assert!(!format!("{config:?}").contains("token-0123456789"));
        let bad = ClientConfig::resolve(ClientArgs {
            common: common(file.path(), dir.path()),
            exits: vec![format!("{}=short", peer(4))],
            ..ClientArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(bad.contains("exits") && !bad.contains("short,"), "{bad}");
        let bad = ClientConfig::resolve(ClientArgs {
            common: common(file.path(), dir.path()),
            exit_token: Some("tiny".into()),
            ..ClientArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(bad.contains("exit_token"), "{bad}");
    }

    #[test]
    fn example_configs_use_only_known_keys() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                FileConfig::load(Some(&path)).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 8, "{seen} example configs");
    }

    #[test]
    fn the_answer_budget_comes_from_file_then_flags_and_must_hold_the_largest_answer() {
        let dir = tempfile::tempdir().unwrap();
        let empty = file_with("");
        let config = ServeConfig::resolve(ServeArgs {
            common: common(empty.path(), dir.path()),
            ..ServeArgs::default()
        })
        .unwrap();
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
    fn exit_gate_and_local_endpoint_settings_come_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with(
            "allow: ['POST /api/pull']\nmax_clock_skew_secs: 30\nreplay_cache_entries: 10\n\
             request_timeout_secs: 3600\nforward_headers: [X-Team]\n\
             allowed_hosts: [Tokengo-Client]\nallowed_origins: ['https://Chat.example.com/']\n",
        );
        let config = ServeConfig::resolve(ServeArgs {
            common: common(file.path(), dir.path()),
            ..ServeArgs::default()
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
        assert_eq!(config.policy.forward_headers, ["x-team"]);
        assert_eq!(config.policy.allowed_hosts, ["tokengo-client"]);
        assert_eq!(config.policy.allowed_origins, ["https://chat.example.com"]);
        // Flags replace the file's list; `allow_defaults: false` keeps only the rules given.
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
        // The defaults when nothing is said.
        let empty = file_with("");
        let config = ClientConfig::resolve(ClientArgs {
            common: common(empty.path(), dir.path()),
            ..ClientArgs::default()
        })
        .unwrap();
        assert_eq!(config.policy, ClientPolicy::default());
        assert_eq!(config.limits.request_timeout, Duration::from_secs(1800));
    }

    #[test]
    fn api_key_becomes_a_sensitive_bearer_header() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("api_key: sk-secret\nheaders: ['X-Org: acme']\n");
        let args = ServeArgs {
            common: common(file.path(), dir.path()),
            ..ServeArgs::default()
        };
        let config = ServeConfig::resolve(args).unwrap();
        let auth = config.backend.headers.0.get("authorization").unwrap();
        assert_eq!(auth, "Bearer sk-secret");
        assert!(auth.is_sensitive());
        assert_eq!(config.backend.headers.0.get("x-org").unwrap(), "acme");
        assert!(!format!("{config:?}").contains("sk-secret"));
        assert!(config.backend.holds_credentials());
        let file = file_with("headers: ['X-Org: acme']\n");
        let plain = ServeConfig::resolve(ServeArgs {
            common: common(file.path(), dir.path()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert!(!plain.backend.holds_credentials());
        let file = file_with("headers: ['X-Api-Key: k', 'X-Org: acme']\n");
        let keyed = ServeConfig::resolve(ServeArgs {
            common: common(file.path(), dir.path()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert!(keyed.backend.holds_credentials());
    }
}
