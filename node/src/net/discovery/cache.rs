//! Known-good relays: the ranking discovery uses and the on-disk cache (`relays.json` in the
//! data directory, mode 0600, replaced atomically) that lets the next start connect even when
//! the DHT is unreachable. The format and the ranking are pure functions; only
//! [`RelayCache::load`] and [`RelayCache::save`] touch the file.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    net::transport::RelayAddr,
    store::data_dir::{self, DataDir},
};

/// File name inside the data directory.
pub const CACHE_FILE: &str = "relays.json";
/// Most relays remembered.
pub const MAX_CACHED: usize = 16;
/// Entries older than this are dropped at load: a relay not verified for a week is a guess.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest cache file read.
const MAX_FILE_BYTES: usize = 256 * 1024;

/// A relay that passed verification: identity-bound TLS, relay-info, a health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRelay {
    /// Its QUIC address (the PeerId in it was proven by TLS).
    pub addr: RelayAddr,
    /// Time for the probe (QUIC handshake and exit list).
    pub rtt: Duration,
    /// Exits whose descriptors verified in the relay's list.
    pub exits: usize,
}

/// Best first: lower verified latency. Hosting exits earns nothing: otherwise a relay that
/// registers an exit of its own would be preferred by every discovering client (the exit a
/// client uses is chosen on its own, not through the relay). Duplicates (same PeerId) keep
/// their best entry.
pub fn rank(relays: &mut Vec<VerifiedRelay>) {
    relays.sort_by_key(|r| r.rtt);
    let mut seen = std::collections::HashSet::new();
    relays.retain(|r| seen.insert(r.addr.peer_id()));
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    version: u32,
    relays: Vec<CachedRelay>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CachedRelay {
    /// `/ip4/…/udp/…/quic-v1/p2p/…`.
    addr: String,
    rtt_ms: u64,
    exits: usize,
    /// Unix seconds of the last successful verification.
    verified_at: u64,
}

/// Encodes relays for the cache file.
#[must_use]
pub fn encode(relays: &[VerifiedRelay], now: u64) -> Vec<u8> {
    let file = CacheFile {
        version: 1,
        relays: relays
            .iter()
            .take(MAX_CACHED)
            .map(|r| CachedRelay {
                addr: r.addr.to_string(),
                rtt_ms: u64::try_from(r.rtt.as_millis()).unwrap_or(u64::MAX),
                exits: r.exits,
                verified_at: now,
            })
            .collect(),
    };
    serde_json::to_vec_pretty(&file).unwrap_or_default()
}

/// Decodes a cache file into relay addresses, best first; unreadable, foreign-version or stale
/// entries are dropped (a cache is a hint, never a reason to fail).
#[must_use]
pub fn decode(bytes: &[u8], now: u64) -> Vec<RelayAddr> {
    let Ok(file) = serde_json::from_slice::<CacheFile>(bytes) else {
        return Vec::new();
    };
    if file.version != 1 {
        return Vec::new();
    }
    file.relays
        .into_iter()
        .filter(|r| now.saturating_sub(r.verified_at) <= MAX_AGE.as_secs())
        .filter_map(|r| r.addr.parse().ok())
        .take(MAX_CACHED)
        .collect()
}

/// The cache file of one node.
#[derive(Debug, Clone)]
pub struct RelayCache {
    path: PathBuf,
}

impl RelayCache {
    /// The cache at `path`.
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The cache in a node's data directory ([`CACHE_FILE`]).
    #[must_use]
    pub fn in_dir(dir: &DataDir) -> Self {
        Self::new(dir.file(CACHE_FILE))
    }

    /// Cached relays, best first; empty when there is no usable cache.
    #[must_use]
    pub fn load(&self, now: u64) -> Vec<RelayAddr> {
        match data_dir::read_if_exists(&self.path) {
            Ok(Some(bytes)) if bytes.len() <= MAX_FILE_BYTES => decode(&bytes, now),
            Ok(_) => Vec::new(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the relay cache; ignoring it");
                Vec::new()
            }
        }
    }

    /// Replaces the cache with `relays` (atomically, mode 0600).
    pub fn save(&self, relays: &[VerifiedRelay], now: u64) -> Result<(), data_dir::DataDirError> {
        data_dir::replace_secret(&self.path, &encode(relays, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;

    fn relay(port: u16, rtt_ms: u64, exits: usize) -> VerifiedRelay {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        VerifiedRelay {
            addr: RelayAddr::new(([127, 0, 0, 1], port).into(), peer),
            rtt: Duration::from_millis(rtt_ms),
            exits,
        }
    }

    #[test]
    fn ranking_is_by_latency_only_and_drops_duplicates() {
        let slow_with_exit = relay(1, 90, 1);
        let fast_without = relay(2, 5, 0);
        let fast_with_exit = relay(3, 10, 2);
        let mut dup = fast_with_exit.clone();
        dup.rtt = Duration::from_millis(50);
        let mut list = vec![
            slow_with_exit.clone(),
            dup,
            fast_with_exit.clone(),
            fast_without.clone(),
        ];
        rank(&mut list);
        // A relay hosting exits (perhaps its own) is not preferred for that.
        assert_eq!(list, vec![fast_without, fast_with_exit, slow_with_exit]);
    }

    #[test]
    fn cache_round_trips_and_drops_stale_or_foreign_entries() {
        let relays = vec![relay(1, 3, 1), relay(2, 4, 0)];
        let bytes = encode(&relays, 1_000);
        let addrs: Vec<_> = relays.iter().map(|r| r.addr.clone()).collect();
        assert_eq!(decode(&bytes, 1_000), addrs);
        assert!(decode(&bytes, 1_000 + MAX_AGE.as_secs() + 1).is_empty());
        assert!(decode(b"not json", 0).is_empty());
        assert!(decode(br#"{"version":2,"relays":[]}"#, 0).is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn cache_file_is_private_and_replaced() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let cache = RelayCache::new(dir.path().join(CACHE_FILE));
        assert!(cache.load(0).is_empty());
        let first = relay(1, 3, 1);
        cache.save(std::slice::from_ref(&first), 10).unwrap();
        let second = relay(2, 3, 1);
        cache.save(std::slice::from_ref(&second), 10).unwrap();
        assert_eq!(cache.load(10), vec![second.addr]);
        let mode = std::fs::metadata(dir.path().join(CACHE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
