//! `tokengo relay`'s configuration: the keys its YAML file takes (`RelayFile`; any other
//! key is refused) and the checked [`RelayConfig`] merged from flags, environment and that
//! file.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use crate::{
    cli::{AdmissionArgs, RelayArgs},
    config::{
        self, ConfigError, DhtFile, Limits, LimitsFile, ObservabilityConfig, Schema, WorkerThreads,
        defaults::DEFAULT_RELAY_LISTEN, invalid,
    },
    net::discovery::DhtConfig,
    store::data_dir::DataDir,
};

/// The keys of `tokengo relay`'s YAML file. Each is also a flag (`--listen` for `listen`,
/// ...) except the limits marked file-only; the meaning and default of each is on the
/// checked configuration and in `config::defaults`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RelayFile {
    /// UDP address for QUIC.
    listen: Option<String>,
    /// Where the relay's identity key lives (and its writable state).
    data_dir: Option<PathBuf>,
    /// Read-only directory the identity key is read from instead.
    keys_dir: Option<PathBuf>,
    /// Threads that run the relay's tasks.
    worker_threads: Option<usize>,
    /// Admin endpoint address (off when absent).
    admin_listen: Option<String>,
    /// OTLP collector base URL for traces.
    otlp_endpoint: Option<String>,
    /// Whether the relay announces itself on the DHT.
    dht_announce: Option<bool>,
    /// UDP address of the relay's DHT node.
    dht_listen: Option<String>,
    /// The relay's public IPs (`/ip4/X`, `/ip6/X`).
    #[serde(default)]
    external_addrs: Vec<String>,
    /// DHT bootstrap peers (multiaddrs with /p2p/).
    #[serde(default)]
    bootstrap: Vec<String>,
    /// Kademlia protocol name.
    dht_protocol: Option<String>,
    /// Addresses the DHT node may dial: public, loopback, any.
    address_policy: Option<String>,
    /// Seconds a DHT query may take (file-only).
    discovery_timeout_secs: Option<u64>,
    /// Seconds without any packet before a client connection is dropped (file-only).
    quic_idle_timeout_secs: Option<u64>,
    /// Seconds a write may wait for a reader that takes no bytes (file-only).
    write_stall_timeout_secs: Option<u64>,
    /// Lowest average rate of a request body, in bytes per second (file-only).
    min_request_body_rate: Option<u64>,
    /// Most exits kept registered (file-only).
    max_exits: Option<usize>,
    /// Streams in flight at one exit from which it is shared fairly by source.
    contended_streams: Option<usize>,
    /// New connections accepted per source address and second (0: no limit).
    source_connections_per_sec: Option<f64>,
    /// New connections accepted from one source address at once.
    source_connection_burst: Option<u32>,
    // No `tunnel_liveness_secs`: a tunnel's QUIC idle timeout is the lower of the two ends',
    // and the relay advertises its `quic_idle_timeout`, so the exit's value governs; a relay
    // key that changed nothing is refused instead of silently ignored.
    /// Seconds an exit may take to start answering a request it has whole.
    exit_answer_timeout_secs: Option<u64>,
}

impl Schema for RelayFile {
    const COMMAND: &'static str = "tokengo relay";
}

/// Checked configuration of `tokengo relay`.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// UDP address for QUIC. Default [`DEFAULT_RELAY_LISTEN`] (`0.0.0.0:4433`).
    pub listen: SocketAddr,
    /// Where the relay keeps writable state, and its identity key unless `keys_dir` is set
    /// (created there on first start).
    pub data_dir: DataDir,
    /// Read-only directory the identity key is read from (`--keys-dir`, a mounted Secret):
    /// never created or written there; a missing key is an error. Default none: the key is
    /// in the data directory.
    pub keys_dir: Option<PathBuf>,
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
    /// UDP address of the relay's libp2p swarm (not the QUIC port). Default
    /// [`DEFAULT_DHT_LISTEN`](crate::config::defaults::DEFAULT_DHT_LISTEN) (`0.0.0.0:4001`).
    pub listen: SocketAddr,
    /// The relay's confirmed public IPs. Default none: then the relay is announced only
    /// under the `loopback` policy (single-host networks) and otherwise reported as invisible.
    pub external_ips: Vec<IpAddr>,
}

impl RelayConfig {
    /// Merges flags, environment and file into a checked configuration.
    pub fn resolve(args: RelayArgs) -> Result<Self, ConfigError> {
        let file: RelayFile = config::load(args.common.config.as_deref())?;
        let listen = args.listen.clone().or_else(|| file.listen.clone());
        let announce = args.dht_announce || file.dht_announce.unwrap_or(false);
        let dht = if announce {
            let dht = DhtFile {
                bootstrap: &file.bootstrap,
                dht_protocol: file.dht_protocol.as_deref(),
                address_policy: file.address_policy.as_deref(),
                discovery_timeout_secs: file.discovery_timeout_secs,
            };
            Some(RelayDhtConfig {
                config: config::dht_config(&args.dht, &dht)?,
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
        let limits = LimitsFile {
            quic_idle_timeout_secs: file.quic_idle_timeout_secs,
            write_stall_timeout_secs: file.write_stall_timeout_secs,
            min_request_body_rate: file.min_request_body_rate,
            max_exits: file.max_exits,
            contended_streams: file.contended_streams,
            source_connections_per_sec: file.source_connections_per_sec,
            source_connection_burst: file.source_connection_burst,
            exit_answer_timeout_secs: file.exit_answer_timeout_secs,
            ..LimitsFile::default()
        };
        Ok(Self {
            listen: config::parse_listen(
                "listen",
                listen.as_deref().unwrap_or(DEFAULT_RELAY_LISTEN),
            )?,
            data_dir: config::data_dir(&args.common, file.data_dir.as_deref())?,
            keys_dir: args.keys.keys_dir.or(file.keys_dir),
            limits: with_admission(Limits::from_file(&limits)?, &args.admission)?
                .with_answer_timeout(&args.answer)?,
            observability: config::observability(
                &args.common,
                file.admin_listen.as_deref(),
                file.otlp_endpoint.as_deref(),
                "relay",
            )?,
            dht,
            worker_threads: WorkerThreads::resolve(&args.common, file.worker_threads)?,
        })
    }
}

/// The relay's admission flags over what the file said.
fn with_admission(limits: Limits, args: &AdmissionArgs) -> Result<Limits, ConfigError> {
    if args.source_connection_burst == Some(0) {
        return Err(invalid(
            "source_connection_burst",
            "must be at least 1 (turn the limit off with --source-connections-per-sec 0)",
        ));
    }
    Ok(Limits {
        contended_streams: args.contended_streams.unwrap_or(limits.contended_streams),
        source_connections_per_sec: config::rate(
            "source_connections_per_sec",
            args.source_connections_per_sec,
        )?
        .unwrap_or(limits.source_connections_per_sec),
        source_connection_burst: args
            .source_connection_burst
            .unwrap_or(limits.source_connection_burst),
        ..limits
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        cli::{AnswerTimeoutArgs, CommonArgs, DhtArgs},
        config::{
            examples,
            test_support::{assert_refused, common, file_with},
        },
        net::discovery::AddressPolicy,
    };

    fn resolve(yaml: &str, dir: &std::path::Path) -> Result<RelayConfig, ConfigError> {
        let file = file_with(yaml);
        RelayConfig::resolve(RelayArgs {
            common: common(file.path(), dir),
            ..RelayArgs::default()
        })
    }

    #[test]
    fn the_example_configs_load() {
        assert!(examples::check::<RelayFile>("relay") >= 3);
    }

    #[test]
    fn keys_of_other_roles_and_typos_are_refused_naming_the_key_and_the_command() {
        let dir = tempfile::tempdir().unwrap();
        assert_refused(
            |yaml| resolve(yaml, dir.path()),
            &[
                ("backend: http://localhost:11434\n", "backend"),
                ("relay: /ip4/127.0.0.1/udp/4433/quic-v1\n", "relay"),
                ("max_request_body_bytes: 1000\n", "max_request_body_bytes"),
                ("request_timeout_secs: 60\n", "request_timeout_secs"),
                ("backnd: http://x\n", "backnd"),
                // The exit's: the relay's end of a tunnel never governs its liveness.
                ("tunnel_liveness_secs: 4\n", "tunnel_liveness_secs"),
            ],
            "tokengo relay",
            "listen, data_dir",
        );
    }

    #[test]
    fn every_relay_key_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let peer = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let config = resolve(
            &format!(
                "listen: 127.0.0.1:4500\nworker_threads: 1\nadmin_listen: 127.0.0.1:9095\n\
                 otlp_endpoint: http://127.0.0.1:4318\ndht_announce: true\n\
                 dht_listen: 127.0.0.1:4101\nexternal_addrs: ['/ip4/203.0.113.7']\n\
                 bootstrap: ['/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{peer}']\n\
                 dht_protocol: /mynet/kad/1.0.0\naddress_policy: loopback\n\
                 discovery_timeout_secs: 5\nquic_idle_timeout_secs: 20\n\
                 write_stall_timeout_secs: 7\nmin_request_body_rate: 1000\nmax_exits: 5\n\
                 contended_streams: 8\nsource_connections_per_sec: 2\n\
                 source_connection_burst: 3\n\
                 exit_answer_timeout_secs: 6\nkeys_dir: /etc/tokengo/keys/relay\n"
            ),
            dir.path(),
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:4500".parse().unwrap());
        assert_eq!(
            config.keys_dir.as_deref(),
            Some(std::path::Path::new("/etc/tokengo/keys/relay"))
        );
        assert_eq!(config.worker_threads.get(), 1);
        let dht = config.dht.unwrap();
        assert_eq!(dht.config.policy, AddressPolicy::Loopback);
        assert_eq!(dht.config.timeout, Duration::from_secs(5));
        let limits = config.limits;
        assert_eq!(limits.quic_idle_timeout, Duration::from_secs(20));
        assert_eq!(limits.write_stall_timeout, Duration::from_secs(7));
        assert_eq!(limits.min_request_body_rate, 1000);
        assert_eq!(limits.max_exits, 5);
        assert_eq!(limits.contended_streams, 8);
        assert!((limits.source_connections_per_sec - 2.0).abs() < f64::EPSILON);
        assert_eq!(limits.source_connection_burst, 3);
        assert_eq!(limits.exit_answer_timeout, Duration::from_secs(6));
    }

    #[test]
    fn defaults_apply_and_the_worker_threads_flag_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = resolve("", dir.path()).unwrap();
        assert_eq!(config.listen, DEFAULT_RELAY_LISTEN.parse().unwrap());
        assert_eq!(config.worker_threads, WorkerThreads::per_core());
        assert!(config.dht.is_none());
        assert!(config.keys_dir.is_none(), "keys live in the data directory");
        // The flag (or TOKENGO_KEYS_DIR) wins over the file.
        let file = file_with("keys_dir: /from/file\n");
        let relay = RelayConfig::resolve(RelayArgs {
            common: common(file.path(), dir.path()),
            keys: crate::cli::KeysDirArgs {
                keys_dir: Some("/from/flag".into()),
            },
            ..RelayArgs::default()
        })
        .unwrap();
        assert_eq!(
            relay.keys_dir.as_deref(),
            Some(std::path::Path::new("/from/flag"))
        );
        let file = file_with("worker_threads: 3\n");
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
    fn observability_keys_are_read_from_the_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let config = resolve(
            "admin_listen: 127.0.0.1:9095\notlp_endpoint: http://127.0.0.1:4318\n",
            dir.path(),
        )
        .unwrap();
        assert_eq!(
            config.observability.admin_listen,
            Some("127.0.0.1:9095".parse().unwrap())
        );
        let error = resolve("otlp_endpoint: collector:4318\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("otlp_endpoint"), "{error}");
    }

    #[test]
    fn the_exit_answer_timeout_comes_from_the_file_and_the_flag_wins() {
        let dir = tempfile::tempdir().unwrap();
        let defaults = Limits::default();
        assert_eq!(defaults.exit_answer_timeout, Duration::from_secs(10));
        let file = file_with("exit_answer_timeout_secs: 20\n");
        let args = RelayArgs {
            common: common(file.path(), dir.path()),
            ..RelayArgs::default()
        };
        let limits = RelayConfig::resolve(args.clone()).unwrap().limits;
        assert_eq!(limits.exit_answer_timeout, Duration::from_secs(20));
        let flagged = RelayArgs {
            answer: AnswerTimeoutArgs {
                exit_answer_timeout_secs: Some(3),
            },
            ..args
        };
        let limits = RelayConfig::resolve(flagged.clone()).unwrap().limits;
        assert_eq!(limits.exit_answer_timeout, Duration::from_secs(3));
        let bad = RelayArgs {
            answer: AnswerTimeoutArgs {
                exit_answer_timeout_secs: Some(0),
            },
            ..flagged
        };
        let error = RelayConfig::resolve(bad).unwrap_err().to_string();
        assert!(error.contains("exit_answer_timeout"), "{error}");
    }

    #[test]
    fn admission_flags_win_over_the_file_and_bad_values_name_their_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with("contended_streams: 4\nsource_connection_burst: 10\n");
        let config = RelayConfig::resolve(RelayArgs {
            common: common(file.path(), dir.path()),
            admission: AdmissionArgs {
                contended_streams: Some(32),
                source_connections_per_sec: Some(0.0),
                source_connection_burst: None,
            },
            ..RelayArgs::default()
        })
        .unwrap();
        assert_eq!(config.limits.contended_streams, 32);
        assert_eq!(config.limits.source_connections_per_sec, 0.0);
        assert_eq!(config.limits.source_connection_burst, 10);
        for (yaml, field) in [
            ("source_connection_burst: 0\n", "source_connection_burst"),
            (
                "source_connections_per_sec: -1\n",
                "source_connections_per_sec",
            ),
            ("max_exits: 1025\n", "max_exits"),
            ("min_request_body_rate: 0\n", "min_request_body_rate"),
            ("quic_idle_timeout_secs: 1\n", "quic_idle_timeout_secs"),
            ("listen: localhost\n", "listen"),
        ] {
            let error = resolve(yaml, dir.path()).unwrap_err().to_string();
            assert!(error.contains(field), "{yaml} -> {error}");
        }
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
        let config = RelayConfig::resolve(args.clone()).unwrap().dht.unwrap();
        assert_eq!(config.config.bootstrap.len(), 1);
        assert_eq!(config.config.protocol.as_ref(), "/mynet/kad/1.0.0");
        assert_eq!(config.config.policy, AddressPolicy::Any);
        assert_eq!(
            config.external_ips,
            vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(config.listen, "127.0.0.1:4101".parse().unwrap());
        let flagged = RelayConfig::resolve(RelayArgs {
            dht: DhtArgs {
                address_policy: Some("loopback".into()),
                ..DhtArgs::default()
            },
            external_addrs: vec!["/ip4/203.0.113.8".into()],
            ..args
        })
        .unwrap()
        .dht
        .unwrap();
        assert_eq!(flagged.config.policy, AddressPolicy::Loopback);
        assert_eq!(
            flagged.external_ips,
            vec!["203.0.113.8".parse::<IpAddr>().unwrap()]
        );
        let error = resolve(
            "dht_announce: true\nexternal_addrs: ['nowhere']\n",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("external_addrs"), "{error}");
    }
}
