//! The record store of every DHT node here: kad's `MemoryStore` keeping many providers per key
//! (a private network's `tokengo bootstrap` servers hold every relay, not the first 20), with
//! each stored provider record bounded so that an answer listing all of them stays well below
//! what a seeker decodes ([`super::MAX_KAD_PACKET`]).

use std::borrow::Cow;

use libp2p::{
    PeerId,
    kad::{
        ProviderRecord, Record, RecordKey,
        store::{self, MemoryStore, MemoryStoreConfig, RecordStore},
    },
};

/// Providers kept per key. First come, as kad's store does (a full list ignores newcomers
/// until records expire), but far above what a private network runs.
pub const MAX_PROVIDERS_PER_KEY: usize = 1024;
/// A provider record listing more addresses than this is not stored (seekers would not
/// contact it either, see [`super::selection::SelectionLimits::max_listed_addrs`]).
pub const MAX_RECORD_ADDRS: usize = 32;
/// A provider record whose addresses take more bytes than this is not stored: with
/// [`MAX_PROVIDERS_PER_KEY`] records an answer stays near 2 MiB at most.
pub const MAX_RECORD_ADDR_BYTES: usize = 2048;

/// `MemoryStore` with many providers per key and bounded provider records.
pub struct ProviderStore {
    inner: MemoryStore,
}

impl std::fmt::Debug for ProviderStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderStore").finish_non_exhaustive()
    }
}

impl ProviderStore {
    /// An empty store for the node `local`.
    #[must_use]
    pub fn new(local: PeerId) -> Self {
        let config = MemoryStoreConfig {
            max_providers_per_key: MAX_PROVIDERS_PER_KEY,
            ..MemoryStoreConfig::default()
        };
        Self {
            inner: MemoryStore::with_config(local, config),
        }
    }
}

/// Whether a provider record is small enough to store.
#[must_use]
pub fn acceptable(record: &ProviderRecord) -> bool {
    record.addresses.len() <= MAX_RECORD_ADDRS
        && record.addresses.iter().map(|a| a.len()).sum::<usize>() <= MAX_RECORD_ADDR_BYTES
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, r: Record) -> store::Result<()> {
        self.inner.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        if !acceptable(&record) {
            // kad answers ADD_PROVIDER with nothing either way; refusing is silent.
            return Err(store::Error::ValueTooLarge);
        }
        self.inner.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.inner.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.inner.remove_provider(k, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::Multiaddr;
    use libp2p_identity::Keypair;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
            .parse()
            .unwrap()
    }

    #[test]
    fn keeps_many_providers_per_key_and_refuses_oversized_records() {
        let mut store = ProviderStore::new(peer());
        let key = RecordKey::new(&b"tokengo");
        for port in 0..100 {
            let record = ProviderRecord::new(key.clone(), peer(), vec![addr(port)]);
            store.add_provider(record).unwrap();
        }
        assert_eq!(store.providers(&key).len(), 100);
        let many = (0..33).map(addr).collect();
        assert!(
            store
                .add_provider(ProviderRecord::new(key.clone(), peer(), many))
                .is_err()
        );
        let long: Multiaddr = format!("/dns4/{}/udp/1/quic-v1", "a".repeat(200))
            .parse()
            .unwrap();
        let bulky = vec![long; 12];
        assert!(
            store
                .add_provider(ProviderRecord::new(key.clone(), peer(), bulky))
                .is_err()
        );
        assert_eq!(store.providers(&key).len(), 100);
    }
}
