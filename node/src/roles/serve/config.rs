//! `tokengo serve`'s configuration: the keys its YAML file takes (`ServeFile`; any other key
//! is refused) and the checked [`ServeConfig`]. Serve runs a relay, an exit and a client in
//! one process over loopback, so its file takes the keys of those three it applies: the local
//! endpoint's (client), the backend's, the gate's and the key rotation (exit), and every limit
//! (all three). Relay addresses, pinned exits, tokens and the DHT are not among them: its
//! relay, exit and client find each other on loopback.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::{
    cli::ServeArgs,
    config::{
        self, ConfigError, Limits, LimitsFile, ObservabilityConfig, Schema, WorkerThreads,
        defaults::DEFAULT_CLIENT_LISTEN,
    },
    roles::{
        client::{
            ClientPolicy,
            config::{LocalEndpointFile, client_policy},
        },
        exit::config::{BackendConfig, BackendFile, GateFile, key_rotation, with_gate},
    },
    store::data_dir::DataDir,
};

/// The keys of `tokengo serve`'s YAML file. Each is also a flag except those marked
/// file-only; the meaning and default of each is on the checked configuration and in
/// `config::defaults`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServeFile {
    /// The local HTTP endpoint.
    listen: Option<String>,
    /// Request headers forwarded besides the defaults.
    #[serde(default)]
    forward_headers: Vec<String>,
    /// Host names answered besides loopback ones.
    #[serde(default)]
    allowed_hosts: Vec<String>,
    /// Web origins answered besides loopback ones.
    #[serde(default)]
    allowed_origins: Vec<String>,
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
    /// Hours between the exit's OHTTP key rotations (0: off).
    key_rotation_hours: Option<f64>,
    /// Where the relay and exit keys live.
    data_dir: Option<PathBuf>,
    /// Threads that run the three roles' tasks.
    worker_threads: Option<usize>,
    /// Admin endpoint address (off when absent).
    admin_listen: Option<String>,
    /// OTLP collector base URL for traces.
    otlp_endpoint: Option<String>,
    /// Largest request body, in bytes (file-only).
    max_request_body_bytes: Option<usize>,
    /// Largest non-streamed response body, in bytes (file-only).
    max_response_body_bytes: Option<usize>,
    /// Seconds without any packet before a QUIC connection is dropped (file-only).
    quic_idle_timeout_secs: Option<u64>,
    /// Seconds a write may wait for a reader that takes no bytes (file-only).
    write_stall_timeout_secs: Option<u64>,
    /// Seconds of silence after which the exit's tunnel counts as dead (file-only).
    tunnel_liveness_secs: Option<u64>,
    /// Seconds the exit may take to start answering a request it has whole (file-only).
    exit_answer_timeout_secs: Option<u64>,
    /// Lowest average rate of a request body at the relay (file-only).
    min_request_body_rate: Option<u64>,
    /// Most exits the relay keeps registered (file-only).
    max_exits: Option<usize>,
    /// Streams in flight at the exit from which the relay shares it by source (file-only).
    contended_streams: Option<usize>,
    /// New connections the relay accepts per source address and second (file-only).
    source_connections_per_sec: Option<f64>,
    /// New connections the relay accepts from one source address at once (file-only).
    source_connection_burst: Option<u32>,
}

impl Schema for ServeFile {
    const COMMAND: &'static str = "tokengo serve";
}

/// Checked configuration of `tokengo serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Local HTTP endpoint. Default [`DEFAULT_CLIENT_LISTEN`] (`127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Which local requests are answered and which headers forwarded.
    pub policy: ClientPolicy,
    /// The AI backend.
    pub backend: BackendConfig,
    /// Where the relay and exit keys live.
    pub data_dir: DataDir,
    /// Time between the exit's OHTTP key rotations; `None` when off. Default
    /// [`DEFAULT_KEY_ROTATION_HOURS`](crate::config::defaults::DEFAULT_KEY_ROTATION_HOURS)
    /// (168 hours).
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
        let file: ServeFile = config::load(args.common.config.as_deref())?;
        let listen = args.listen.as_deref().or(file.listen.as_deref());
        let local = LocalEndpointFile {
            forward_headers: &file.forward_headers,
            allowed_hosts: &file.allowed_hosts,
            allowed_origins: &file.allowed_origins,
        };
        let backend = BackendFile {
            backend: file.backend.as_deref(),
            api_key: file.api_key.as_deref(),
            headers: &file.headers,
            backend_idle_timeout_secs: file.backend_idle_timeout_secs,
            backend_connect_timeout_secs: file.backend_connect_timeout_secs,
            allow: &file.allow,
            allow_defaults: file.allow_defaults,
        };
        let gate = GateFile {
            max_clock_skew_secs: file.max_clock_skew_secs,
            replay_cache_entries: file.replay_cache_entries,
            answer_budget_bytes: file.answer_budget_bytes,
            answer_budget_wait_secs: file.answer_budget_wait_secs,
        };
        let limits = LimitsFile {
            max_request_body_bytes: file.max_request_body_bytes,
            max_response_body_bytes: file.max_response_body_bytes,
            quic_idle_timeout_secs: file.quic_idle_timeout_secs,
            write_stall_timeout_secs: file.write_stall_timeout_secs,
            tunnel_liveness_secs: file.tunnel_liveness_secs,
            exit_answer_timeout_secs: file.exit_answer_timeout_secs,
            min_request_body_rate: file.min_request_body_rate,
            max_exits: file.max_exits,
            contended_streams: file.contended_streams,
            source_connections_per_sec: file.source_connections_per_sec,
            source_connection_burst: file.source_connection_burst,
        };
        Ok(Self {
            listen: config::parse_listen("listen", listen.unwrap_or(DEFAULT_CLIENT_LISTEN))?,
            policy: client_policy(&args.local, &local)?,
            backend: BackendConfig::resolve(args.backend, &args.gate, &backend)?,
            data_dir: config::data_dir(&args.common, file.data_dir.as_deref())?,
            key_rotation: key_rotation(args.key_rotation_hours.or(file.key_rotation_hours))?,
            limits: with_gate(
                Limits::from_file(&limits)?
                    .with_request(&args.request, file.request_timeout_secs)?,
                &args.gate,
                &gate,
            )?,
            observability: config::observability(
                &args.common,
                file.admin_listen.as_deref(),
                file.otlp_endpoint.as_deref(),
                "serve",
            )?,
            worker_threads: WorkerThreads::resolve(&args.common, file.worker_threads)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cli::{BackendArgs, CommonArgs},
        config::{
            examples,
            test_support::{assert_refused, common, file_with},
        },
    };

    fn resolve(yaml: &str, dir: &std::path::Path) -> Result<ServeConfig, ConfigError> {
        let file = file_with(yaml);
        ServeConfig::resolve(ServeArgs {
            common: common(file.path(), dir),
            ..ServeArgs::default()
        })
    }

    #[test]
    fn the_example_config_loads() {
        assert!(examples::check::<ServeFile>("serve") >= 1);
    }

    #[test]
    fn keys_serve_does_not_apply_are_refused_naming_the_key_and_the_command() {
        let dir = tempfile::tempdir().unwrap();
        assert_refused(
            |yaml| resolve(yaml, dir.path()),
            &[
                ("relay: /ip4/127.0.0.1/udp/4433/quic-v1\n", "relay"),
                ("exits: []\n", "exits"),
                ("public: true\n", "public"),
                ("bootstrap: []\n", "bootstrap"),
                ("dht_announce: true\n", "dht_announce"),
                ("max_relays: 2\n", "max_relays"),
                ("backnd: http://x\n", "backnd"),
            ],
            "tokengo serve",
            "listen, forward_headers",
        );
    }

    #[test]
    fn every_serve_key_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let config = resolve(
            "listen: 127.0.0.1:9000\nforward_headers: [X-Team]\nallowed_hosts: [h]\n\
             allowed_origins: ['https://o.example']\nbackend: http://127.0.0.1:1\napi_key: k\n\
             headers: ['X-Org: a']\nbackend_idle_timeout_secs: 9\n\
             backend_connect_timeout_secs: 8\nallow: ['GET /api/ps']\nallow_defaults: true\n\
             max_clock_skew_secs: 30\nreplay_cache_entries: 10\n\
             answer_budget_bytes: 100000000\nanswer_budget_wait_secs: 3\n\
             request_timeout_secs: 60\nkey_rotation_hours: 0\ndata_dir: /nonexistent\n\
             worker_threads: 1\nadmin_listen: 127.0.0.1:9098\n\
             otlp_endpoint: http://127.0.0.1:4318\nmax_request_body_bytes: 1000\n\
             max_response_body_bytes: 8000000\nquic_idle_timeout_secs: 20\n\
             write_stall_timeout_secs: 7\ntunnel_liveness_secs: 4\n\
             exit_answer_timeout_secs: 6\nmin_request_body_rate: 100\nmax_exits: 2\n\
             contended_streams: 8\nsource_connections_per_sec: 2\n\
             source_connection_burst: 3\n",
            dir.path(),
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.policy.forward_headers, ["x-team"]);
        assert_eq!(config.key_rotation, None);
        assert_eq!(config.worker_threads.get(), 1);
        assert_eq!(config.backend.idle_timeout, Duration::from_secs(9));
        let limits = &config.limits;
        assert_eq!(limits.max_request_body, 1000);
        assert_eq!(limits.request_timeout, Duration::from_secs(60));
        assert_eq!(limits.max_clock_skew, Duration::from_secs(30));
        assert_eq!(limits.answer_budget_wait, Duration::from_secs(3));
        assert_eq!(limits.tunnel_liveness, Duration::from_secs(4));
        assert_eq!(limits.exit_answer_timeout, Duration::from_secs(6));
        assert_eq!(limits.min_request_body_rate, 100);
        assert_eq!(limits.max_exits, 2);
        assert_eq!(limits.contended_streams, 8);
        assert_eq!(limits.source_connection_burst, 3);
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
        assert_eq!(
            config.key_rotation,
            Some(Duration::from_secs(168 * 3600)),
            "a week by default"
        );
        let config = resolve("", dir.path()).unwrap();
        assert_eq!(config.listen, DEFAULT_CLIENT_LISTEN.parse().unwrap());
        assert_eq!(config.backend.url.as_str(), "http://localhost:11434/");
        assert_eq!(config.policy, ClientPolicy::default());
        assert_eq!(config.worker_threads, WorkerThreads::per_core());
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
            ("key_rotation_hours: -1\n", "key_rotation_hours"),
            ("worker_threads: 0\n", "worker_threads"),
            ("worker_threads: 5000\n", "worker_threads"),
        ];
        for (yaml, field) in cases {
            let error = resolve(yaml, dir.path()).unwrap_err().to_string();
            assert!(error.contains(field), "{yaml} -> {error}");
        }
    }

    #[test]
    fn the_worker_threads_flag_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("worker_threads: 3\n");
        let config = ServeConfig::resolve(ServeArgs {
            common: CommonArgs {
                worker_threads: Some(2),
                ..common(file.path(), dir.path())
            },
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(config.worker_threads.get(), 2);
    }
}
