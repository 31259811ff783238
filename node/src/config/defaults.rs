//! Every default and limit of the node in one place: what a setting is when nobody sets it,
//! the range a setting accepts, and the fixed limits ARCHITECTURE.md's "Timeouts and limits"
//! table lists. Modules that apply a value import it from here (under their own name where
//! it reads better there), so the table and the code have one source. Purely internal tuning
//! of one module (a poll interval, a backoff step) stays in that module. This module imports
//! nothing of the crate, so every layer may use it.

use std::{ops::RangeInclusive, time::Duration};

// Addresses and endpoints.

/// Default local HTTP endpoint of the client and serve: loopback only, so nothing on the
/// network can use it.
pub const DEFAULT_CLIENT_LISTEN: &str = "127.0.0.1:8080";
/// Default relay QUIC address: all interfaces, since a relay exists to be reached.
pub const DEFAULT_RELAY_LISTEN: &str = "0.0.0.0:4433";
/// Default backend of an exit: a local Ollama, as in the original TokenGo.
pub const DEFAULT_BACKEND: &str = "http://localhost:11434";
/// Default UDP address of a relay's, an exit's or a bootstrap node's DHT swarm (the IPFS
/// port).
pub const DEFAULT_DHT_LISTEN: &str = "0.0.0.0:4001";
/// Default time an OTLP export request may take (the OpenTelemetry default).
pub const DEFAULT_OTLP_TIMEOUT: Duration = Duration::from_secs(10);

// Threads.

/// Most worker threads a role accepts (`worker_threads`); the default is one per CPU core.
pub const MAX_WORKER_THREADS: usize = 1024;

// Request sizes and times (`config::Limits`).

/// Default largest request body the client accepts and the exit decodes
/// (`max_request_body_bytes`): 32 MiB.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 32 << 20;
/// Default largest non-streamed (single-message) response body (`max_response_body_bytes`):
/// 64 MiB.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 64 << 20;
/// Default QUIC idle timeout of client connections (`quic_idle_timeout_secs`): 30 s.
pub const DEFAULT_QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Seconds `quic_idle_timeout_secs` accepts: keep-alives go at a third of it, so below 3 s
/// they would have to be sub-second.
pub const QUIC_IDLE_TIMEOUT_SECS: RangeInclusive<u64> = 3..=600;
/// Default longest wait for an answer to begin (`request_timeout_secs`): 30 minutes, since a
/// non-streaming backend sends its head only when generation ends.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Seconds `request_timeout_secs` accepts (a day at most).
pub const REQUEST_TIMEOUT_SECS: RangeInclusive<u64> = 1..=86_400;
/// Default time a write may wait for a reader that takes no bytes
/// (`write_stall_timeout_secs`): 30 s.
pub const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Seconds `write_stall_timeout_secs` accepts.
pub const WRITE_STALL_TIMEOUT_SECS: RangeInclusive<u64> = 1..=3600;
/// How long the relay waits for an exit's tunnel to take a new stream (`open_bi`) before it
/// answers `ExitUnavailable`: 10 s.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default silence after which an exit tunnel counts as dead (`tunnel_liveness_secs`): 2 s,
/// so a request at an exit that crashes ends within about 2.5 s, and three keep-alives in a
/// row must be lost for a live tunnel to count as dead.
pub const DEFAULT_TUNNEL_LIVENESS: Duration = Duration::from_secs(2);
/// Seconds `tunnel_liveness_secs` accepts.
pub const TUNNEL_LIVENESS_SECS: RangeInclusive<u64> = 1..=60;
/// Default time an exit may take to send the first byte of its answer once the relay has
/// sent it a whole version 2 request (`exit_answer_timeout_secs`): 10 s.
pub const DEFAULT_EXIT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds `exit_answer_timeout_secs` accepts.
pub const EXIT_ANSWER_TIMEOUT_SECS: RangeInclusive<u64> = 1..=600;
/// Default lowest average rate of a request body at the relay once the grace has passed
/// (`min_request_body_rate`): 16 KiB/s.
pub const DEFAULT_MIN_REQUEST_BODY_RATE: u64 = 16 * 1024;
/// Time a request body may take at the relay before its rate counts: 10 s.
pub const REQUEST_BODY_GRACE: Duration = Duration::from_secs(10);

// The exit's replay protection and answer memory.

/// Default largest distance between a request's `Date` and the exit's clock
/// (`max_clock_skew_secs`): 60 s.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Seconds `max_clock_skew_secs` accepts.
pub const MAX_CLOCK_SKEW_SECS: RangeInclusive<u64> = 1..=3600;
/// Default number of recent requests the exit remembers against replay
/// (`replay_cache_entries`): 2,097,152, about 80 MiB when full.
pub const DEFAULT_REPLAY_CACHE_ENTRIES: usize = 1 << 21;
/// Values `replay_cache_entries` accepts (each costs about 100 bytes at most).
pub const REPLAY_CACHE_ENTRIES: RangeInclusive<usize> = 1..=67_108_864;
/// Default most bytes of single-message answers the exit holds at once
/// (`answer_budget_bytes`): 256 MiB.
pub const DEFAULT_ANSWER_BUDGET: usize = 256 << 20;
/// Default time one answer may wait for the answer budget before a 503
/// (`answer_budget_wait_secs`): 10 s.
pub const DEFAULT_ANSWER_BUDGET_WAIT: Duration = Duration::from_secs(10);
/// Seconds `answer_budget_wait_secs` accepts.
pub const ANSWER_BUDGET_WAIT_SECS: RangeInclusive<u64> = 1..=600;

// The exit's backend.

/// Default time without a byte from the backend before a request is abandoned
/// (`backend_idle_timeout_secs`): 300 s, since a large model may think that long before its
/// first token.
pub const DEFAULT_BACKEND_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time a backend connection may take to establish
/// (`backend_connect_timeout_secs`): 10 s.
pub const DEFAULT_BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

// The client.

/// Largest exit list a client accepts from a relay: 4 MiB.
pub const CLIENT_MAX_LIST_BYTES: usize = 4 << 20;
/// Most exits a client accepts from one relay: 1024.
pub const CLIENT_MAX_EXITS: usize = 1024;
/// How much longer than the request timeout the client waits for the exit, so the exit
/// reports a backend timeout first: 30 s.
pub const CLIENT_TIMEOUT_MARGIN: Duration = Duration::from_secs(30);

// The exit's keys and relays.

/// Longest time the previous OHTTP key is still accepted after a rotation: 15 minutes (the
/// overlap is the smaller of this and the rotation period). A key is needed only until a
/// request's header is decapsulated (a long answer keeps the context it derived, not the
/// key), so what the overlap must cover is how long clients take to learn the new key: they
/// fetch relay lists every minute and DHT exit records every 10 minutes, and a client that
/// still missed it gets "key unknown", refreshes and retries the same exit once. A short
/// overlap limits how long a key that may have leaked still opens requests.
pub const MAX_KEY_OVERLAP: Duration = Duration::from_secs(15 * 60);

/// How often an exit whose keys are in a read-only key directory (`--keys-dir`) reads its
/// keyring file again: the directory's writer rotates it (in Kubernetes the operator, in a
/// Secret the kubelet updates in place within about a minute), and the exit serves the new
/// ring without a restart. Reading a file of a few hundred bytes every 5 s costs nothing, and
/// the previous key stays in the ring, so a few seconds' lag fails no request.
pub const KEY_FOLLOW_INTERVAL: Duration = Duration::from_secs(5);

/// Default hours between an exit's OHTTP key rotations (`key_rotation_hours`): a week.
pub const DEFAULT_KEY_ROTATION_HOURS: f64 = 168.0;
/// Longest rotation period `key_rotation_hours` accepts: ten years, in hours.
pub const MAX_KEY_ROTATION_HOURS: f64 = 87_600.0;
/// Shortest rotation period accepted (a fraction of an hour is allowed down to it, so tests
/// and the fault suite can rotate every few seconds).
pub const MIN_KEY_ROTATION: Duration = Duration::from_secs(1);
/// Most relays one exit process is given (`relay`), one tunnel each.
pub const MAX_EXIT_RELAYS: usize = 16;
/// Values `max_relays` (discovered relays an exit registers with) accepts.
pub const MAX_RELAYS: RangeInclusive<usize> = 1..=16;

// Discovery.

/// The DHT protocol of the public IPFS network: the default of `dht_protocol`.
pub const DEFAULT_DHT_PROTOCOL: &str = "/ipfs/kad/1.0.0";
/// The public IPFS (Amino) bootstrap peers, as Kubo ships them: the default of `bootstrap`.
/// The `/dnsaddr` entries are resolved at dial time (TXT records under `_dnsaddr.`), so the
/// list follows the operators' changes; the literal-IP peer keeps a way in when DNS is
/// unavailable.
pub const PUBLIC_BOOTSTRAP: &[&str] = &[
    "/dnsaddr/bootstrap.libp2p.io/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
    "/dnsaddr/bootstrap.libp2p.io/p2p/QmQCU2EcMqAqQPR2i9bChDtGNJchTbq5TbXJJ16u19uLTa",
    "/dnsaddr/bootstrap.libp2p.io/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb",
    "/dnsaddr/bootstrap.libp2p.io/p2p/QmcZf59bWwK5XFi76CZX8cbJ4BhTzzA3gU1ZjYZcYW3dwt",
    "/dnsaddr/va1.bootstrap.libp2p.io/p2p/12D3KooWKnDdG3iXw9eTFijk3EWSunZcFi54Zka4wmtqtt6rPxc8",
    "/ip4/104.131.131.82/udp/4001/quic-v1/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ",
];
/// How long a start may look for relays before giving up (`discovery_timeout_secs`): 30 s.
pub const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Seconds `discovery_timeout_secs` accepts.
pub const DISCOVERY_TIMEOUT_SECS: RangeInclusive<u64> = 1..=600;
/// Default number of discovered relays an exit registers with (`max_relays`), one tunnel
/// each: 3.
pub const DEFAULT_MAX_RELAYS: usize = 3;
/// First wait before discovering again while an exit holds fewer relays than it wants, or
/// Relays a client keeps for failover.
pub const CLIENT_RELAYS: usize = 3;
/// An announcer republishes this often by default: go-libp2p-kad-dht servers answer a
/// provider with the addresses their peerstore holds, which lapse 15 minutes after the
/// provider's last connection to them; each publication reconnects and renews them.
pub const DEFAULT_REPUBLISH: Duration = Duration::from_secs(10 * 60);
/// A provide (lookup of the closest peers, then ADD_PROVIDER to each) may take this long:
/// on Amino the median is near 30 s and the 95th percentile over 2 minutes.
pub const DEFAULT_PROVIDE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The self-check after publishing may take this long.
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// After the first verified relay, how long to wait for better ones (private DHTs).
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(1);
/// The same on the public DHT, where providers keep arriving for seconds (lookups there
/// take ~0.4 s median, ~2 s at p99, then each relay is dialled and probed).
pub const PUBLIC_SETTLE: Duration = Duration::from_secs(5);
/// while every relay of a client is down; it doubles after each discovery that did not help.
pub const REDISCOVER_MIN: Duration = Duration::from_secs(5);
/// Longest wait between such discoveries.
pub const REDISCOVER_MAX: Duration = Duration::from_secs(300);
/// How long a discovered relay may stay unreachable (its tunnel unregistered) before the exit
/// drops it and looks for another: 10 s. A restarting relay is back well within it.
pub const LOST_RELAY_AFTER: Duration = Duration::from_secs(10);
/// How often an exit resolves again a relay it was given by DNS name (`/dns4/NAME/...`), to
/// keep one tunnel per address the name resolves to: 10 s. A Kubernetes headless Service
/// name lists one A record per ready relay pod, so a new pod gets the exit's tunnel within
/// it, and a pod that left stops being redialled. The name is also resolved again at once
/// when a tunnel to one of its addresses is lost.
pub const RELAY_RESOLVE_INTERVAL: Duration = Duration::from_secs(10);
/// Most addresses of one relay name an exit keeps tunnels to (the first ones, in address
/// order): a DNS answer decides how many tunnels, sockets and tasks the exit holds, so it is
/// bounded. 64 replicas of one relay are far more than one relay needs.
pub const MAX_RELAY_NAME_ADDRESSES: usize = 64;

// Streams and connections (QUIC).

/// How long a peer may take to send a stream's header, at the relay and at the exit: 10 s.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(10);
/// How long shutdown waits for the streams and requests in flight (relay, exit): 30 s.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// Receive window of one stream. quinn's default (1.25 MB) times its default 256 streams let
/// one connection make a relay buffer ~320 MB; 256 KiB still carries a stream at ~20 Mbit/s
/// over a 100 ms path (a model's output is a few KiB/s) and at Gbit/s on a LAN.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// Receive window of a whole connection (quinn's default is unlimited): what one client
/// connection can make a relay buffer, whatever its stream count. 4 MiB.
pub const CONNECTION_WINDOW: u32 = 4 << 20;
/// Receive window of an exit's tunnel at the relay: 128 MiB. It carries every client's
/// responses, and data a stalled client does not take stays counted here until the relay's
/// write stall timeout resets that stream: 512 stalled streams would be needed to stop the
/// tunnel.
pub const TUNNEL_WINDOW: u32 = 128 << 20;
/// Bytes sent and not yet acknowledged, per connection (quinn's default is 10 MB): 4 MiB.
pub const SEND_WINDOW: u64 = 4 << 20;

// The relay.

/// Concurrent request streams one client connection may have open at the relay: 256.
pub const MAX_CLIENT_STREAMS: u32 = 256;
/// Concurrent request streams the relay may open on an exit's tunnel: 1024.
pub const MAX_TUNNEL_STREAMS: u32 = 1024;
/// Most stream slots the relay accounts for one exit, whatever its descriptor claims: 1024.
pub const MAX_EXIT_SLOTS: u32 = 1024;
/// How long a request may wait for one of its exit's stream slots when the exit is full and
/// its connection is below its fair share (`relay::slots`); then it is answered `Overloaded`.
/// 5 s.
pub const SLOT_WAIT: Duration = Duration::from_secs(5);
/// Largest control frame (`REGISTER`; a signed descriptor is at most 16 KiB): 32 KiB.
pub const MAX_CONTROL_FRAME: usize = 32 * 1024;
/// Malformed request headers the relay answers on one connection at once; then
/// [`MALFORMED_HEADERS_PER_SEC`], and once spent the connection is closed. 16.
pub const MALFORMED_HEADER_BURST: u32 = 16;
/// Malformed request headers per second after the burst: 2.
pub const MALFORMED_HEADERS_PER_SEC: f64 = 2.0;
/// Registrations one exit tunnel may send at once (re-registration, key rotation), then
/// [`TUNNEL_REGISTRATIONS_PER_SEC`]: 4. An exit re-registers every 12 hours and at key
/// rotation.
pub const TUNNEL_REGISTRATION_BURST: u32 = 4;
/// Registrations per tunnel and second after the burst: one a minute.
pub const TUNNEL_REGISTRATIONS_PER_SEC: f64 = 1.0 / 60.0;
/// Byte budget of all descriptors a relay keeps registered: 3 MiB, so the exit list (status
/// byte, counts and lengths included) stays well under the [`CLIENT_MAX_LIST_BYTES`] a client
/// reads.
pub const MAX_EXIT_LIST_BYTES: usize = 3 << 20;
/// Byte budget of the descriptors a relay-info answer carries: 900 KiB, so its whole message
/// stays under `tokengo_proto::relay_info::MAX_RESPONSE_BYTES` (1 MiB). Exits beyond it are
/// left out of relay-info (clients get them from the exit list over QUIC).
pub const MAX_RELAY_INFO_BYTES: usize = 900 * 1024;

/// The most exits `max_exits` may be: below the 1024 entries a client accepts, with room.
/// Also its default.
pub const MAX_EXITS_CEILING: usize = 1000;
/// Default registrations of new exit identities a relay accepts at once: 256, then
/// [`NEW_EXIT_REGISTRATIONS_PER_SEC`].
pub const NEW_EXIT_REGISTRATION_BURST: u32 = 256;
/// Registrations of new exit identities per second after the burst: 16.
pub const NEW_EXIT_REGISTRATIONS_PER_SEC: u32 = 16;
/// Handshakes in progress above which the relay asks new clients to prove their address
/// first (QUIC Retry): 64.
pub const RETRY_ABOVE_HANDSHAKES: usize = 64;
/// Default streams in flight at one exit from which the relay shares it fairly by source
/// (`contended_streams`): 16.
pub const DEFAULT_CONTENDED_STREAMS: usize = 16;
/// Default new connections per source address and second after the burst
/// (`source_connections_per_sec`): 8.
pub const DEFAULT_SOURCE_CONNECTIONS_PER_SEC: f64 = 8.0;
/// Default new connections from one source address at once (`source_connection_burst`): 64.
pub const DEFAULT_SOURCE_CONNECTION_BURST: u32 = 64;
