//! Relay and exit discovery on a Kademlia DHT (the public IPFS "Amino" DHT by default, or a
//! private one).
//!
//! - Relays *announce*: they provide the sha2-256 multihash of `/tokengo/relay/v1`
//!   ([`tokengo_proto::relay_info::provider_key`]) with a confirmed external address, and answer
//!   `/tokengo/relay-info/1` with their QUIC addresses, ALPNs and the exits they host. kad
//!   republishes the record on its own schedule (12 h; records live 48 h).
//! - Exits that announce provide `/tokengo/exit/v1` the same way once registered with a relay,
//!   and answer `/tokengo/exit-info/1` with their descriptor and relays, signed by the exit
//!   ([`exits`]), so clients learn exits independently of any single relay.
//! - Clients and exits *seek*: with a fresh libp2p identity they look the key up, ask each
//!   provider for its relay-info while the lookup runs (kad knows a provider's addresses only
//!   then), and verify each relay before use: identity-bound QUIC TLS to an address naming the
//!   provider's PeerId, and a health probe (the exit list) that gives the latency.
//!   Known-good relays are cached in the data directory for the next start.
//! - `tokengo bootstrap` runs a DHT *server* for private networks.
//!
//! Every dial passes the [`policy::AddressPolicy`] (a transport wrapper), so a DHT full of
//! private addresses cannot make a node scan its own network. The protocol logic without I/O
//! (key, messages, ranking, cache format, address policy) lives in `tokengo_proto::relay_info`
//! and the submodules. The async shells around the libp2p swarm: `swarm` builds it, `seek`
//! finds relays, `announce` publishes a node, `server` is the DHT server, `exits` looks exits
//! up. This file holds what they share: the DHT's configuration, defaults and errors.

mod announce;
pub mod cache;
mod codec;
pub mod exits;
mod gate;
mod lookup;
mod peer_routing;
pub mod policy;
mod probe;
mod seek;
pub mod selection;
mod server;
pub mod store;
mod swarm;
mod verification;

use std::time::Duration;

use libp2p::{Multiaddr, StreamProtocol};

pub use announce::{Announcer, Answer, ExitInfoSource, InfoSource, announce, announce_with};
pub use cache::{CACHE_FILE, RelayCache, VerifiedRelay, rank};
pub use exits::{ExitLookup, ExitRefusal, FoundExit, exit_info_source, find_exits};
pub use policy::{AddressPolicy, DialGuard, DialRecord};
pub use probe::{ProbeError, verify};
pub use seek::{Discovered, Seek, discover, or_fallback};
pub use selection::{Selection, SelectionLimits, SelectionStats};
pub use server::DhtServer;
pub use swarm::{MAX_KAD_PACKET, quic_multiaddr};

pub use crate::ops::status::Verification;

/// The DHT protocol and bootstrap peers of the public IPFS network, and how long a start
/// looks for relays: the defaults of `dht_protocol`, `bootstrap` and `discovery_timeout_secs`.
pub use crate::config::defaults::{
    CLIENT_RELAYS, DEFAULT_DHT_PROTOCOL, DEFAULT_DISCOVERY_TIMEOUT, DEFAULT_PROVIDE_TIMEOUT,
    DEFAULT_REPUBLISH, DEFAULT_SETTLE, DEFAULT_VERIFY_TIMEOUT, PUBLIC_BOOTSTRAP, PUBLIC_SETTLE,
};
/// A lookup that found nothing is repeated after this (a relay may announce a moment later).
const REQUERY: Duration = Duration::from_secs(2);

/// A discovery failure.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The swarm could not be built.
    #[error("starting the DHT node: {0}")]
    Swarm(String),
    /// The swarm could not listen.
    #[error(
        "cannot listen for DHT peers on {addr}: {reason} (choose another port with --dht-listen)"
    )]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// Nothing usable was found in time.
    #[error(
        "no relay found via DHT after {secs} s; pass --relay or --fallback-relay, or --bootstrap for a private network (and check that a relay announces on it)"
    )]
    NoRelay {
        /// The time spent.
        secs: u64,
    },
    /// Shutdown came first.
    #[error("discovery cancelled by shutdown")]
    Cancelled,
}

/// The DHT a node joins.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    /// Bootstrap peers (each with `/p2p/`). Default: [`PUBLIC_BOOTSTRAP`].
    pub bootstrap: Vec<Multiaddr>,
    /// The kad protocol name. Default `/ipfs/kad/1.0.0`; private networks may use their own.
    pub protocol: StreamProtocol,
    /// Which addresses may be dialled. Default `public`.
    pub policy: AddressPolicy,
    /// How long a start looks for relays. Default 30 s.
    pub timeout: Duration,
}

impl DhtConfig {
    /// The public IPFS DHT with its defaults.
    #[must_use]
    pub fn public() -> Self {
        Self {
            bootstrap: PUBLIC_BOOTSTRAP
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            protocol: StreamProtocol::new(DEFAULT_DHT_PROTOCOL),
            policy: AddressPolicy::Public,
            timeout: DEFAULT_DISCOVERY_TIMEOUT,
        }
    }
}

/// How long a seeker waits for better relays after the first one on `config`'s DHT:
/// [`PUBLIC_SETTLE`] on the public protocol, [`DEFAULT_SETTLE`] on private ones.
#[must_use]
pub fn settle_for(config: &DhtConfig) -> Duration {
    if config.protocol.as_ref() == DEFAULT_DHT_PROTOCOL {
        PUBLIC_SETTLE
    } else {
        DEFAULT_SETTLE
    }
}

/// The announcer's timing (see [`announce_with`]).
#[derive(Debug, Clone)]
pub struct AnnounceSchedule {
    /// How often the provider record is published again. Default [`DEFAULT_REPUBLISH`].
    pub republish: Duration,
    /// How long one publication may take. Default [`DEFAULT_PROVIDE_TIMEOUT`].
    pub provide_timeout: Duration,
    /// How long the self-check after a publication may take. Default
    /// [`DEFAULT_VERIFY_TIMEOUT`].
    pub verify_timeout: Duration,
}

impl Default for AnnounceSchedule {
    fn default() -> Self {
        Self {
            republish: DEFAULT_REPUBLISH,
            provide_timeout: DEFAULT_PROVIDE_TIMEOUT,
            verify_timeout: DEFAULT_VERIFY_TIMEOUT,
        }
    }
}

impl AnnounceSchedule {
    /// The default schedule on a clock where `minute` stands for a minute (tests against
    /// DHT servers with shortened lifetimes). Timeouts are not scaled.
    #[must_use]
    pub fn scaled(minute: Duration) -> Self {
        Self {
            republish: minute * 10,
            ..Self::default()
        }
    }
}

/// Whether a lookup loop waits for the next event or is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Wait,
    Done,
}

/// Sleeps until `at`, or forever when there is no `at` (a timer that may be unset).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_dht_waits_longer_for_more_relays() {
        assert_eq!(settle_for(&DhtConfig::public()), PUBLIC_SETTLE);
        let private = DhtConfig {
            protocol: StreamProtocol::new("/mynet/kad/1.0.0"),
            ..DhtConfig::public()
        };
        assert_eq!(settle_for(&private), DEFAULT_SETTLE);
        assert!(PUBLIC_SETTLE > DEFAULT_SETTLE);
        // Republishing renews go servers' 15-minute address lifetime with margin.
        assert!(DEFAULT_REPUBLISH + Duration::from_secs(60) < Duration::from_secs(15 * 60));
        assert!(DEFAULT_PROVIDE_TIMEOUT > DEFAULT_DISCOVERY_TIMEOUT);
    }
}
