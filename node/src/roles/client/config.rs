//! `tokengo client`'s configuration: the keys its YAML file takes (`ClientFile`; any other
//! key is refused) and the checked [`ClientConfig`] merged from flags, environment and that
//! file. The local endpoint's policy ([`ClientPolicy`]) is also what `tokengo serve`'s client
//! runs with, so serve builds it from here.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf};

use http::HeaderName;
use libp2p_identity::PeerId;
use serde::Deserialize;

use super::ClientPolicy;
use crate::{
    cli::{ClientArgs, LocalEndpointArgs},
    config::{
        self, ConfigError, DhtFile, Limits, LimitsFile, ObservabilityConfig, OneOrMany, Schema,
        WorkerThreads, defaults::DEFAULT_CLIENT_LISTEN, invalid,
    },
    net::{discovery::DhtConfig, transport::RelayAddr},
    roles::access::{AccessToken, ExitTokens},
    store::data_dir::DataDir,
};

/// The keys of `tokengo client`'s YAML file. Each is also a flag (`--relay` for `relay`,
/// `--exit` for `exits`, ...) except those marked file-only; the meaning and default of each
/// is on the checked configuration and in `config::defaults`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientFile {
    /// The local HTTP endpoint.
    listen: Option<String>,
    /// The relays to send requests through: one, or a list.
    relay: Option<OneOrMany>,
    /// Exit PeerIds requests may go to (`PEERID` or `PEERID=TOKEN`).
    #[serde(default)]
    exits: Vec<String>,
    /// Access token for exits that require one.
    exit_token: Option<String>,
    /// Request headers forwarded besides the defaults.
    #[serde(default)]
    forward_headers: Vec<String>,
    /// Host names answered besides loopback ones.
    #[serde(default)]
    allowed_hosts: Vec<String>,
    /// Web origins answered besides loopback ones.
    #[serde(default)]
    allowed_origins: Vec<String>,
    /// Seconds a request may wait for its answer to begin.
    request_timeout_secs: Option<u64>,
    /// Where the relay cache lives.
    data_dir: Option<PathBuf>,
    /// Threads that run the client's tasks.
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
    /// Largest request body accepted, in bytes (file-only).
    max_request_body_bytes: Option<usize>,
    /// Largest non-streamed response body accepted, in bytes (file-only).
    max_response_body_bytes: Option<usize>,
    /// Seconds without any packet before a relay connection is dropped (file-only).
    quic_idle_timeout_secs: Option<u64>,
}

impl Schema for ClientFile {
    const COMMAND: &'static str = "tokengo client";
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
    /// Local HTTP endpoint. Default [`DEFAULT_CLIENT_LISTEN`] (`127.0.0.1:8080`).
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
        let file: ClientFile = config::load(args.common.config.as_deref())?;
        let listen = args.listen.as_deref().or(file.listen.as_deref());
        let (exits, per_exit) = pinned_exits(config::flags_or_file(&args.exits, &file.exits))?;
        let default = args
            .exit_token
            .as_deref()
            .or(file.exit_token.as_deref())
            .map(|t| AccessToken::parse(t).map_err(|e| invalid("exit_token", e.to_string())))
            .transpose()?;
        let file_relays = file.relay.clone().map(OneOrMany::into_vec);
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
            ..LimitsFile::default()
        };
        Ok(Self {
            relays: config::relay_addrs(
                "relay",
                &args.relays,
                file_relays.as_deref().unwrap_or_default(),
            )?,
            exits,
            exit_tokens: ExitTokens { default, per_exit },
            dht: config::dht_config(&args.dht, &dht)?,
            fallback_relays: config::relay_addrs(
                "fallback_relays",
                &args.fallback.fallback_relays,
                &file.fallback_relays,
            )?,
            data_dir: config::data_dir(&args.common, file.data_dir.as_deref())?,
            listen: config::parse_listen("listen", listen.unwrap_or(DEFAULT_CLIENT_LISTEN))?,
            policy: client_policy(&args.local, &file.local_endpoint())?,
            limits: Limits::from_file(&limits)?
                .with_request(&args.request, file.request_timeout_secs)?,
            observability: config::observability(
                &args.common,
                file.admin_listen.as_deref(),
                file.otlp_endpoint.as_deref(),
                "client",
            )?,
            worker_threads: WorkerThreads::resolve(&args.common, file.worker_threads)?,
        })
    }
}

impl ClientFile {
    fn local_endpoint(&self) -> LocalEndpointFile<'_> {
        LocalEndpointFile {
            forward_headers: &self.forward_headers,
            allowed_hosts: &self.allowed_hosts,
            allowed_origins: &self.allowed_origins,
        }
    }
}

/// The local endpoint's keys of a file (client, serve).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LocalEndpointFile<'a> {
    /// `forward_headers`.
    pub(crate) forward_headers: &'a [String],
    /// `allowed_hosts`.
    pub(crate) allowed_hosts: &'a [String],
    /// `allowed_origins`.
    pub(crate) allowed_origins: &'a [String],
}

/// What the local endpoint answers and forwards. Flags replace the file's lists.
pub(crate) fn client_policy(
    args: &LocalEndpointArgs,
    file: &LocalEndpointFile<'_>,
) -> Result<ClientPolicy, ConfigError> {
    let forward_headers = config::flags_or_file(&args.forward_headers, file.forward_headers)
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
    let lower = |list: &[String], field: &'static str| {
        list.iter()
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
            config::flags_or_file(&args.allowed_hosts, file.allowed_hosts),
            "allowed_hosts",
        )?,
        allowed_origins: lower(
            config::flags_or_file(&args.allowed_origins, file.allowed_origins),
            "allowed_origins",
        )?,
    })
}

/// A client's pinned exits and their access tokens, each `PEERID` or `PEERID=TOKEN`.
fn pinned_exits(
    raw: &[String],
) -> Result<(Vec<PeerId>, HashMap<PeerId, AccessToken>), ConfigError> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        cli::DhtArgs,
        config::{
            examples,
            test_support::{assert_refused, common, file_with},
        },
        net::discovery::AddressPolicy,
    };

    fn peer(n: u8) -> PeerId {
        libp2p_identity::Keypair::ed25519_from_bytes([n; 32])
            .unwrap()
            .public()
            .to_peer_id()
    }

    fn resolve(yaml: &str, dir: &std::path::Path) -> Result<ClientConfig, ConfigError> {
        let file = file_with(yaml);
        ClientConfig::resolve(ClientArgs {
            common: common(file.path(), dir),
            ..ClientArgs::default()
        })
    }

    #[test]
    fn the_example_configs_load() {
        assert!(examples::check::<ClientFile>("client") >= 2);
    }

    #[test]
    fn keys_of_other_roles_and_typos_are_refused_naming_the_key_and_the_command() {
        let dir = tempfile::tempdir().unwrap();
        assert_refused(
            |yaml| resolve(yaml, dir.path()),
            &[
                ("backend: http://localhost:11434\n", "backend"),
                ("public: true\n", "public"),
                ("max_exits: 10\n", "max_exits"),
                ("write_stall_timeout_secs: 5\n", "write_stall_timeout_secs"),
                ("dht_announce: true\n", "dht_announce"),
                ("allowed_host: [x]\n", "allowed_host"),
            ],
            "tokengo client",
            "listen, relay, exits",
        );
    }

    #[test]
    fn every_client_key_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let relay = format!("/ip4/127.0.0.1/udp/4401/quic-v1/p2p/{}", peer(1));
        let config = resolve(
            &format!(
                "listen: 127.0.0.1:9000\nrelay: {relay}\nexits: ['{}']\n\
                 exit_token: default-token-0123456789\nforward_headers: [X-Team]\n\
                 allowed_hosts: [Tokengo-Client]\nallowed_origins: ['https://Chat.example.com/']\n\
                 request_timeout_secs: 3600\ndata_dir: /nonexistent\nworker_threads: 2\n\
                 admin_listen: 127.0.0.1:9097\notlp_endpoint: http://127.0.0.1:4318\n\
                 bootstrap: []\ndht_protocol: /ipfs/kad/1.0.0\naddress_policy: loopback\n\
                 discovery_timeout_secs: 3\nfallback_relays: [{relay}]\n\
                 max_request_body_bytes: 1000\nmax_response_body_bytes: 2000\n\
                 quic_idle_timeout_secs: 20\n",
                peer(2)
            ),
            dir.path(),
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.relays.len(), 1);
        assert_eq!(config.exits, vec![peer(2)]);
        assert!(config.exit_tokens.for_exit(&peer(2)).is_some());
        assert_eq!(config.policy.forward_headers, ["x-team"]);
        assert_eq!(config.policy.allowed_hosts, ["tokengo-client"]);
        assert_eq!(config.policy.allowed_origins, ["https://chat.example.com"]);
        assert_eq!(config.worker_threads.get(), 2);
        assert_eq!(config.dht.policy, AddressPolicy::Loopback);
        assert_eq!(config.dht.timeout, Duration::from_secs(3));
        assert_eq!(config.fallback_relays.len(), 1);
        assert_eq!(config.limits.request_timeout, Duration::from_secs(3600));
        assert_eq!(config.limits.max_request_body, 1000);
        assert_eq!(config.limits.max_response_body, 2000);
        assert_eq!(config.limits.quic_idle_timeout, Duration::from_secs(20));
    }

    #[test]
    fn defaults_apply_when_nothing_is_said() {
        let dir = tempfile::tempdir().unwrap();
        let config = resolve("", dir.path()).unwrap();
        assert_eq!(config.listen, DEFAULT_CLIENT_LISTEN.parse().unwrap());
        assert_eq!(config.policy, ClientPolicy::default());
        assert_eq!(config.limits.request_timeout, Duration::from_secs(1800));
        assert_eq!(config.worker_threads, WorkerThreads::per_core());
        assert!(config.relays.is_empty() && config.exits.is_empty());
    }

    #[test]
    fn client_relays_and_pinned_exits_from_flags_or_file() {
        let dir = tempfile::tempdir().unwrap();
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
        // One relay as a plain string still works.
        let one = file_with(&format!("relay: {}\n", relay(7)));
        let config = ClientConfig::resolve(ClientArgs {
            common: common(one.path(), dir.path()),
            ..ClientArgs::default()
        })
        .unwrap();
        assert_eq!(config.relays[0].peer_id(), peer(7));
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
    fn dht_settings_come_from_the_file_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with(&format!(
            "bootstrap: ['/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{}']\ndht_protocol: /mynet/kad/1.0.0\n",
            peer(9)
        ));
        let from_file = ClientConfig::resolve(ClientArgs {
            common: common(file.path(), dir.path()),
            ..ClientArgs::default()
        })
        .unwrap();
        assert_eq!(from_file.dht.policy, AddressPolicy::Any);
        let flagged = ClientConfig::resolve(ClientArgs {
            common: common(file.path(), dir.path()),
            dht: DhtArgs {
                address_policy: Some("loopback".into()),
                ..DhtArgs::default()
            },
            ..ClientArgs::default()
        })
        .unwrap();
        assert_eq!(flagged.dht.policy, AddressPolicy::Loopback);
    }

    #[test]
    fn local_endpoint_values_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for (yaml, field) in [
            ("forward_headers: [authorization]\n", "forward_headers"),
            ("forward_headers: [user-agent]\n", "forward_headers"),
            ("allowed_hosts: ['']\n", "allowed_hosts"),
            ("listen: localhost\n", "listen"),
            ("request_timeout_secs: 0\n", "request_timeout"),
            ("max_request_body_bytes: 0\n", "max_request_body_bytes"),
        ] {
            let error = resolve(yaml, dir.path()).unwrap_err().to_string();
            assert!(error.contains(field), "{yaml} -> {error}");
        }
    }
}
