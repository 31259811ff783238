//! Command-line interface: the roles and their flags. Every flag can also come from an
//! environment variable (`TOKENGO_*`) or a YAML file (`--config`); flags win over the
//! environment, the environment over the file. Each role's `config` module
//! (`roles::<role>::config`, on the shared pieces in `crate::config`) turns these raw inputs
//! into its checked configuration, and its YAML file takes only the keys that role uses.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// TokenGo: a private, decentralized gateway for OpenAI-compatible AI APIs.
#[derive(Debug, Parser)]
#[command(name = "tokengo", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "TOKENGO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log format the user asked for.
    #[must_use]
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The roles.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay, client and exit in one process: a private endpoint on 127.0.0.1:8080.
    Serve(ServeArgs),
    /// Local OpenAI-compatible endpoint that encrypts every request to an exit.
    Client(ClientArgs),
    /// Blind forwarder between clients and exits (QUIC, UDP 4433).
    Relay(RelayArgs),
    /// Decrypts requests, calls the AI backend, encrypts the answers.
    Exit(ExitArgs),
    /// Creates a key file and prints its public part.
    Keygen(KeygenArgs),
    /// Runs a DHT server (bootstrap) node for a private TokenGo network and prints its multiaddr.
    Bootstrap(BootstrapArgs),
    /// Asks a running node's admin endpoint how it is doing and prints a short summary.
    Status(StatusArgs),
}

/// Flags every long-running role shares.
#[derive(Debug, Clone, Default, Args)]
pub struct CommonArgs {
    /// YAML configuration file.
    #[arg(short = 'c', long = "config", env = "TOKENGO_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for keys (default: $XDG_DATA_HOME/tokengo or ~/.local/share/tokengo).
    #[arg(long, env = "TOKENGO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Admin endpoint (/metrics, /healthz, /readyz, /status), e.g. 127.0.0.1:9090 (default: off).
    #[arg(long, env = "TOKENGO_ADMIN_LISTEN", value_name = "IP:PORT")]
    pub admin_listen: Option<String>,
    /// Export traces over OTLP HTTP/protobuf to this collector, e.g. http://127.0.0.1:4318
    /// (default: off, or as the OTEL_* environment variables say).
    #[arg(long, env = "TOKENGO_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Threads that run the role's tasks (default: one per CPU core; 1 is faster on a small
    /// host that several TokenGo processes share, see README "Performance").
    #[arg(long, env = "TOKENGO_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
}

/// Where a relay or an exit reads its keys when they are provisioned for it (a mounted
/// Secret in Kubernetes) rather than created in its data directory.
#[derive(Debug, Clone, Default, Args)]
pub struct KeysDirArgs {
    /// Read the identity (and an exit's OHTTP keyring) from this directory, read-only: nothing
    /// is created or written there, and a missing key is an error. The data directory keeps
    /// the writable state. An exit with it cannot rotate its own keys (--key-rotation-hours
    /// 0). Default: keys in the data directory, created on first start.
    #[arg(long, env = "TOKENGO_KEYS_DIR", value_name = "DIR")]
    pub keys_dir: Option<PathBuf>,
}

/// Where relays are discovered: the DHT to join and what discovery may dial.
#[derive(Debug, Clone, Default, Args)]
pub struct DhtArgs {
    /// DHT bootstrap peer, /ip4/HOST/udp/PORT/quic-v1/p2p/PEERID (repeatable; comma-separated
    /// in TOKENGO_BOOTSTRAP). Default: the public IPFS bootstrap peers.
    #[arg(
        long = "bootstrap",
        env = "TOKENGO_BOOTSTRAP",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub bootstrap: Vec<String>,
    /// Kademlia protocol name (default /ipfs/kad/1.0.0, the public IPFS DHT).
    #[arg(long, env = "TOKENGO_DHT_PROTOCOL", value_name = "PROTOCOL")]
    pub dht_protocol: Option<String>,
    /// Addresses discovery may dial: public, loopback or any (default: public on the public
    /// DHT, any with --bootstrap and a --dht-protocol of their own).
    #[arg(long, env = "TOKENGO_ADDRESS_POLICY", value_name = "POLICY")]
    pub address_policy: Option<String>,
}

/// Relays a discovering role (client, exit) uses when discovery finds none; a relay or
/// bootstrap node has no use for them, so they do not take the flag.
#[derive(Debug, Clone, Default, Args)]
pub struct FallbackArgs {
    /// Relay used when neither the DHT nor the relay cache yields one (repeatable;
    /// comma-separated in TOKENGO_FALLBACK_RELAYS). Default: none.
    #[arg(
        long = "fallback-relay",
        env = "TOKENGO_FALLBACK_RELAYS",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub fallback_relays: Vec<String>,
}

/// Flags of `tokengo bootstrap`.
#[derive(Debug, Clone, Default, Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub dht: DhtArgs,
    /// UDP address of the DHT server (default 0.0.0.0:4001).
    #[arg(short = 'l', long, env = "TOKENGO_LISTEN")]
    pub listen: Option<String>,
    /// This node's public IP, e.g. /ip4/203.0.113.7 (repeatable).
    #[arg(
        long = "external-addr",
        env = "TOKENGO_EXTERNAL_ADDRS",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub external_addrs: Vec<String>,
}

/// Flags of `tokengo serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Address of the local HTTP endpoint (default 127.0.0.1:8080).
    #[arg(short = 'l', long, env = "TOKENGO_LISTEN")]
    pub listen: Option<String>,
    #[command(flatten)]
    pub local: LocalEndpointArgs,
    #[command(flatten)]
    pub gate: ExitGateArgs,
    #[command(flatten)]
    pub request: RequestArgs,
    /// Hours between the exit's OHTTP key rotations (default 168; 0 turns rotation off).
    #[arg(long, env = "TOKENGO_KEY_ROTATION_HOURS", value_name = "HOURS")]
    pub key_rotation_hours: Option<f64>,
}

/// How long one request may take, shared by the client and the exit.
#[derive(Debug, Clone, Default, Args)]
pub struct RequestArgs {
    /// Longest a request may wait for its answer to begin, in seconds (default 1800: a
    /// non-streamed answer arrives only when generation ends).
    #[arg(
        long = "request-timeout",
        env = "TOKENGO_REQUEST_TIMEOUT",
        value_name = "SECS"
    )]
    pub request_timeout_secs: Option<u64>,
}

/// How fast an exit notices a dead tunnel (the exit's; the relay follows it).
#[derive(Debug, Clone, Default, Args)]
pub struct TunnelLivenessArgs {
    /// Seconds of silence after which the exit's tunnel to a relay counts as dead, with
    /// keep-alives at a third of it (default 2): a lost relay is redialled within it, and since
    /// a QUIC connection's idle timeout is the lower of the two ends', a crashed exit also
    /// leaves the relay's list within it. An exit flag only: the relay's end never governs.
    #[arg(
        long = "tunnel-liveness",
        env = "TOKENGO_TUNNEL_LIVENESS",
        value_name = "SECS"
    )]
    pub tunnel_liveness_secs: Option<u64>,
}

/// How long the relay waits for an exit to start answering (the relay's bound).
#[derive(Debug, Clone, Default, Args)]
pub struct AnswerTimeoutArgs {
    /// Seconds an exit may take, once a request has reached it whole, to send the first byte
    /// of its answer (an exit sends it before calling its backend) before the relay takes the
    /// request back and it is tried elsewhere (default 10). A relay flag only.
    #[arg(
        long = "exit-answer-timeout",
        env = "TOKENGO_EXIT_ANSWER_TIMEOUT",
        value_name = "SECS"
    )]
    pub exit_answer_timeout_secs: Option<u64>,
}

/// What the local endpoint answers and what it forwards.
#[derive(Debug, Clone, Default, Args)]
pub struct LocalEndpointArgs {
    /// Also forward this request header to the exit (repeatable; comma-separated in
    /// TOKENGO_FORWARD_HEADERS). Default: content type and negotiation, OpenAI-Beta,
    /// anthropic-version, anthropic-beta.
    #[arg(
        long = "forward-header",
        env = "TOKENGO_FORWARD_HEADERS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub forward_headers: Vec<String>,
    /// Also answer requests for this Host name (repeatable; `*` for any). Default: loopback
    /// names and addresses only.
    #[arg(
        long = "allowed-host",
        env = "TOKENGO_ALLOWED_HOSTS",
        value_delimiter = ',',
        value_name = "HOST"
    )]
    pub allowed_hosts: Vec<String>,
    /// Also answer browser requests from this web origin, e.g. https://chat.example.com
    /// (repeatable; `*` for any). Default: loopback origins only.
    #[arg(
        long = "allowed-origin",
        env = "TOKENGO_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    pub allowed_origins: Vec<String>,
}

/// What the exit lets reach its backend, and its replay protection.
#[derive(Debug, Clone, Default, Args)]
pub struct ExitGateArgs {
    /// Also pass this endpoint to the backend, `METHOD /path` or `METHOD /path/*` (`*` as
    /// method for any; repeatable; comma-separated in TOKENGO_ALLOW). Default: the inference
    /// endpoints listed in the README.
    #[arg(
        long = "allow",
        env = "TOKENGO_ALLOW",
        value_delimiter = ',',
        value_name = "RULE"
    )]
    pub allow: Vec<String>,
    /// With false, only the --allow endpoints pass (they replace the defaults).
    #[arg(long, env = "TOKENGO_ALLOW_DEFAULTS", value_name = "BOOL")]
    pub allow_defaults: Option<bool>,
    /// Largest accepted difference between a request's Date and the exit's clock, in
    /// seconds (default 60).
    #[arg(
        long = "max-clock-skew",
        env = "TOKENGO_MAX_CLOCK_SKEW",
        value_name = "SECS"
    )]
    pub max_clock_skew_secs: Option<u64>,
    /// Most recent requests remembered against replay; beyond it new requests are refused
    /// (default 2097152).
    #[arg(long, env = "TOKENGO_REPLAY_CACHE_ENTRIES", value_name = "N")]
    pub replay_cache_entries: Option<usize>,
    /// Most bytes of non-streamed answers held in memory at once, all requests together
    /// (default 268435456, 256 MiB); beyond it answers wait, then get a 503.
    #[arg(long, env = "TOKENGO_ANSWER_BUDGET_BYTES", value_name = "BYTES")]
    pub answer_budget_bytes: Option<usize>,
    /// Seconds an answer may wait for the answer budget before a 503 (default 10).
    #[arg(
        long = "answer-budget-wait",
        env = "TOKENGO_ANSWER_BUDGET_WAIT",
        value_name = "SECS"
    )]
    pub answer_budget_wait_secs: Option<u64>,
}

/// Flags of `tokengo client`.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Relay multiaddr, e.g. /ip4/203.0.113.7/udp/4433/quic-v1/p2p/12D3Koo... (repeatable;
    /// comma-separated in TOKENGO_RELAY). Each request takes a relay that lists its exit.
    /// Default: discover relays on the DHT.
    #[arg(
        short = 'r',
        long = "relay",
        env = "TOKENGO_RELAY",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub relays: Vec<String>,
    /// Exit PeerId requests may go to (repeatable; comma-separated in TOKENGO_EXITS), or
    /// PEERID=TOKEN for an exit that requires an access token. When set, no other exit is
    /// ever used, whatever a relay lists. Default: any exit, chosen at random among the
    /// corroborated ones.
    #[arg(
        long = "exit",
        env = "TOKENGO_EXITS",
        value_delimiter = ',',
        value_name = "PEERID[=TOKEN]",
        hide_env_values = true
    )]
    pub exits: Vec<String>,
    /// Access token for exits that require one (a group's token), sent inside the encrypted
    /// request: the relay never sees it. Default: none (exits that require a token are
    /// skipped).
    #[arg(
        long,
        env = "TOKENGO_EXIT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub exit_token: Option<String>,
    /// Address of the local HTTP endpoint (default 127.0.0.1:8080).
    #[arg(short = 'l', long, env = "TOKENGO_LISTEN")]
    pub listen: Option<String>,
    #[command(flatten)]
    pub dht: DhtArgs,
    #[command(flatten)]
    pub fallback: FallbackArgs,
    #[command(flatten)]
    pub local: LocalEndpointArgs,
    #[command(flatten)]
    pub request: RequestArgs,
}

/// Flags of `tokengo relay`.
#[derive(Debug, Clone, Default, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub keys: KeysDirArgs,
    /// UDP address to accept QUIC on (default 0.0.0.0:4433).
    #[arg(short = 'l', long, env = "TOKENGO_LISTEN")]
    pub listen: Option<String>,
    #[command(flatten)]
    pub dht: DhtArgs,
    /// Announce this relay on the DHT (default: off).
    #[arg(long, env = "TOKENGO_DHT_ANNOUNCE")]
    pub dht_announce: bool,
    /// UDP address of the relay's DHT node (default 0.0.0.0:4001).
    #[arg(long, env = "TOKENGO_DHT_LISTEN", value_name = "IP:PORT")]
    pub dht_listen: Option<String>,
    /// The relay's public IP, e.g. /ip4/203.0.113.7 (repeatable). Required to announce on the
    /// public DHT: a relay without a confirmed external address is invisible.
    #[arg(
        long = "external-addr",
        env = "TOKENGO_EXTERNAL_ADDRS",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub external_addrs: Vec<String>,
    #[command(flatten)]
    pub admission: AdmissionArgs,
    #[command(flatten)]
    pub answer: AnswerTimeoutArgs,
}

/// How much one source address may cost a relay (flags win over the file's keys of the same
/// names).
#[derive(Debug, Clone, Default, Args)]
pub struct AdmissionArgs {
    /// Streams in flight at one exit from which the relay shares it fairly among client
    /// addresses active there; each then keeps at most its part in flight, its further
    /// requests wait (0: share only a full exit). Default 16.
    #[arg(long, env = "TOKENGO_CONTENDED_STREAMS", value_name = "N")]
    pub contended_streams: Option<usize>,
    /// New connections accepted per source address and second, after a burst (0: no limit).
    /// Default 8.
    #[arg(long, env = "TOKENGO_SOURCE_CONNECTIONS_PER_SEC", value_name = "N")]
    pub source_connections_per_sec: Option<f64>,
    /// New connections accepted from one source address at once. Default 64.
    #[arg(long, env = "TOKENGO_SOURCE_CONNECTION_BURST", value_name = "N")]
    pub source_connection_burst: Option<u32>,
}

/// Flags of `tokengo exit`.
#[derive(Debug, Clone, Default, Args)]
pub struct ExitArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub keys: KeysDirArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Relay multiaddr to register with, e.g. /ip4/203.0.113.7/udp/4433/quic-v1/p2p/12D3Koo...
    /// (repeatable, or comma-separated in TOKENGO_RELAY): one process keeps a tunnel to each.
    /// The exit serves only through the relays it is given, unless --public.
    #[arg(
        short = 'r',
        long = "relay",
        env = "TOKENGO_RELAY",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub relays: Vec<String>,
    /// Serve the public: without --relay, discover relays on the DHT and register with them,
    /// so anyone who finds this exit can use it and its backend credentials (default: off,
    /// the exit is private to the relay given with --relay).
    #[arg(long, env = "TOKENGO_PUBLIC")]
    pub public: bool,
    /// File of group access tokens, one per line: only requests that carry one of them reach
    /// the backend. Re-read when its contents change (default: none, no token needed).
    #[arg(long, env = "TOKENGO_ACCESS_TOKEN_FILE", value_name = "FILE")]
    pub access_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub dht: DhtArgs,
    #[command(flatten)]
    pub fallback: FallbackArgs,
    /// Most discovered relays to register with (default 3).
    #[arg(long, env = "TOKENGO_MAX_RELAYS")]
    pub max_relays: Option<usize>,
    /// Hours between OHTTP key rotations (default 168; 0 turns rotation off; fractions
    /// allowed, e.g. 0.001 for a rotation every 3.6 s in tests). The previous key stays
    /// valid for an overlap of the smaller of the period and 15 minutes.
    #[arg(long, env = "TOKENGO_KEY_ROTATION_HOURS", value_name = "HOURS")]
    pub key_rotation_hours: Option<f64>,
    #[command(flatten)]
    pub gate: ExitGateArgs,
    #[command(flatten)]
    pub request: RequestArgs,
    #[command(flatten)]
    pub liveness: TunnelLivenessArgs,
    /// Announce this exit on the DHT, so clients learn it and its relays independently of any
    /// one relay (default: on for a --public exit, off otherwise; only a public exit may).
    /// `--dht-announce false` turns it off.
    #[arg(
        long,
        env = "TOKENGO_DHT_ANNOUNCE",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub dht_announce: Option<bool>,
    /// UDP address of the exit's DHT node (default 0.0.0.0:4001).
    #[arg(long, env = "TOKENGO_DHT_LISTEN", value_name = "IP:PORT")]
    pub dht_listen: Option<String>,
    /// The exit's public IP, e.g. /ip4/203.0.113.9 (repeatable). Required to announce on the
    /// public DHT; an exit behind NAT has none and is then known only from relays' lists.
    #[arg(
        long = "external-addr",
        env = "TOKENGO_EXTERNAL_ADDRS",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub external_addrs: Vec<String>,
}

/// Where the exit sends requests and with which credentials.
#[derive(Debug, Clone, Default, Args)]
pub struct BackendArgs {
    /// AI backend base URL (default http://localhost:11434, Ollama).
    #[arg(short = 'b', long, env = "TOKENGO_BACKEND")]
    pub backend: Option<String>,
    /// API key sent to the backend as `Authorization: Bearer KEY`.
    #[arg(long, env = "TOKENGO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Extra header for the backend, `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
}

/// Flags of `tokengo status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Base URL of the node's admin endpoint (its --admin-listen address).
    #[arg(long, env = "TOKENGO_ADMIN", default_value = "http://127.0.0.1:9090")]
    pub admin: String,
    /// Print the raw JSON report instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// What `tokengo keygen` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyType {
    /// An OHTTP (HPKE X25519) key for an exit; prints its key configuration.
    Ohttp,
    /// An Ed25519 node identity; prints its PeerId.
    Identity,
}

/// Flags of `tokengo keygen`.
#[derive(Debug, Clone, Args)]
pub struct KeygenArgs {
    /// Kind of key.
    #[arg(short = 't', long = "type", value_enum)]
    pub key_type: KeyType,
    /// File to write (created with mode 0600; an existing file is never overwritten).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Key id of an OHTTP key (0-255).
    #[arg(long, default_value_t = 1)]
    pub key_id: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn client_takes_several_relays_and_pinned_exits() {
        use clap::Parser as _;
        let cli = Cli::try_parse_from([
            "tokengo", "client", "--relay", "/a", "--relay", "/b,/c", "--exit", "X", "--exit", "Y",
        ])
        .unwrap();
        let Command::Client(args) = cli.command else {
            panic!("not the client")
        };
        assert_eq!(args.relays, ["/a", "/b", "/c"]);
        assert_eq!(args.exits, ["X", "Y"]);
    }

    #[test]
    fn only_the_relay_and_the_exit_take_a_keys_dir() {
        use clap::Parser as _;
        let flag = ["--keys-dir", "/etc/tokengo/keys/relay"];
        for role in ["relay", "exit"] {
            let args = [&["tokengo", role][..], &flag[..]].concat();
            let cli = Cli::try_parse_from(args).unwrap();
            let keys = match cli.command {
                Command::Relay(args) => args.keys.keys_dir,
                Command::Exit(args) => args.keys.keys_dir,
                _ => None,
            };
            assert_eq!(keys, Some(PathBuf::from(flag[1])), "{role}");
        }
        for role in ["serve", "client", "bootstrap"] {
            let args = [&["tokengo", role][..], &flag[..]].concat();
            assert!(Cli::try_parse_from(args).is_err(), "{role}");
        }
    }

    #[test]
    fn each_liveness_flag_belongs_to_the_end_it_governs() {
        use clap::Parser as _;
        // The exit's idle timeout governs its tunnels; the relay's answer timeout is the
        // relay's. The other role refuses each rather than taking a flag that changes nothing.
        for (flag, takes, refuses) in [
            ("--tunnel-liveness", "exit", "relay"),
            ("--exit-answer-timeout", "relay", "exit"),
        ] {
            let parsed = Cli::try_parse_from(["tokengo", takes, flag, "5"]);
            assert!(parsed.is_ok(), "{takes} {flag}: {parsed:?}");
            let refused = Cli::try_parse_from(["tokengo", refuses, flag, "5"]);
            let error = refused.expect_err(flag).to_string();
            assert!(error.contains(flag), "{refuses} {flag}: {error}");
        }
    }

    #[test]
    fn only_discovering_roles_take_fallback_relays() {
        use clap::Parser as _;
        let flag = ["--fallback-relay", "/ip4/127.0.0.1/udp/1/quic-v1"];
        for role in ["client", "exit"] {
            let args = [&["tokengo", role][..], &flag[..]].concat();
            assert!(Cli::try_parse_from(args).is_ok(), "{role}");
        }
        for role in ["relay", "bootstrap"] {
            let args = [&["tokengo", role][..], &flag[..]].concat();
            assert!(Cli::try_parse_from(args).is_err(), "{role}");
        }
    }
}
