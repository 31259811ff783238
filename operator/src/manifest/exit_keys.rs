//! The layout of an exit's key Secret: one identity and OHTTP keyring per StatefulSet ordinal,
//! under the Secret keys `<ordinal>.exit_identity.key` and `<ordinal>.ohttp_keys.json` (the
//! node's file names, `tokengo_proto::data_dir`, after the ordinal). A Secret written before
//! exits had one identity per replica holds the two files without an ordinal: that identity
//! is read as ordinal 0's (so clients that pinned it keep working) and written back under
//! ordinal 0's names. Pure: parsing, filling missing ordinals, rotating, encoding.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use tokengo_proto::data_dir::{EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE};
use zeroize::Zeroizing;

use crate::keys::{self, KeyError, Keyring};

/// Why a key Secret cannot be read as an exit's keys. It is never overwritten then: a person
/// must look.
#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    /// One file of an ordinal does not parse.
    #[error("{key}: {error}")]
    Invalid {
        /// The Secret key.
        key: String,
        /// What is wrong with it.
        error: KeyError,
    },
    /// An ordinal has one of its two files but not the other.
    #[error("{present} is there but {missing} is not")]
    Incomplete {
        /// The Secret key that is there.
        present: String,
        /// The Secret key that is missing.
        missing: String,
    },
    /// Two ordinals hold one identity: their pods would evict each other at every relay.
    #[error("ordinals {first} and {second} have the same identity {peer_id}")]
    SharedIdentity {
        /// The lower ordinal.
        first: u32,
        /// The higher ordinal.
        second: u32,
        /// Their PeerId.
        peer_id: String,
    },
}

/// The Secret key of `ordinal`'s identity.
#[must_use]
pub fn identity_key(ordinal: u32) -> String {
    format!("{ordinal}.{EXIT_IDENTITY_FILE}")
}

/// The Secret key of `ordinal`'s OHTTP keyring.
#[must_use]
pub fn keyring_key(ordinal: u32) -> String {
    format!("{ordinal}.{EXIT_KEYRING_FILE}")
}

/// One replica's keys.
pub struct ReplicaKeys {
    /// The encoded identity, written back unchanged whenever the Secret is rewritten.
    identity: Zeroizing<Vec<u8>>,
    /// Its PeerId.
    pub peer_id: String,
    /// Its OHTTP keyring.
    pub keyring: Keyring,
}

impl std::fmt::Debug for ReplicaKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaKeys")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl ReplicaKeys {
    fn read(identity: &[u8], keyring: &[u8], names: (&str, &str)) -> Result<Self, KeySetError> {
        let invalid = |key: &str| {
            let key = key.to_owned();
            move |error| KeySetError::Invalid { key, error }
        };
        let peer_id = keys::peer_id(identity)
            .map_err(invalid(names.0))?
            .to_string();
        let keyring = Keyring::parse(keyring).map_err(|e| invalid(names.1)(KeyError::from(e)))?;
        Ok(Self {
            identity: Zeroizing::new(identity.to_vec()),
            peer_id,
            keyring,
        })
    }

    fn generate(now: u64) -> Result<Self, KeyError> {
        let identity = keys::new_identity()?;
        let peer_id = keys::peer_id(&identity)?.to_string();
        Ok(Self {
            identity,
            peer_id,
            keyring: Keyring::generate(1, now)?,
        })
    }
}

/// Every replica's keys as one key Secret holds them, plus the Secret keys that are not the
/// operator's (kept as they are).
#[derive(Debug)]
pub struct ExitKeySet {
    replicas: BTreeMap<u32, ReplicaKeys>,
    /// Whether ordinal 0 was read from the files without an ordinal (written back under
    /// ordinal 0's names).
    legacy: bool,
    /// Secret keys that are not an ordinal's files.
    other: BTreeMap<String, ByteString>,
}

impl ExitKeySet {
    /// An empty set (no ordinal yet).
    #[must_use]
    pub fn new() -> Self {
        Self {
            replicas: BTreeMap::new(),
            legacy: false,
            other: BTreeMap::new(),
        }
    }

    /// Reads a key Secret's data: every ordinal with both files, ordinal 0 from the files
    /// without an ordinal when it has none of its own.
    pub fn parse(data: &BTreeMap<String, ByteString>) -> Result<Self, KeySetError> {
        let mut ordinals = BTreeSet::new();
        let mut other = BTreeMap::new();
        for (key, value) in data {
            match ordinal_of(key) {
                Some(ordinal) => {
                    ordinals.insert(ordinal);
                }
                None => {
                    other.insert(key.clone(), value.clone());
                }
            }
        }
        let mut set = Self {
            replicas: BTreeMap::new(),
            legacy: false,
            other,
        };
        for ordinal in ordinals {
            let names = (identity_key(ordinal), keyring_key(ordinal));
            let keys = read_pair(data, (&names.0, &names.1))?;
            set.replicas.insert(ordinal, keys);
        }
        let legacy_files = (
            set.other.contains_key(EXIT_IDENTITY_FILE),
            set.other.contains_key(EXIT_KEYRING_FILE),
        );
        if !set.replicas.contains_key(&0) && legacy_files != (false, false) {
            let keys = read_pair(&set.other, (EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE))?;
            set.other.remove(EXIT_IDENTITY_FILE);
            set.other.remove(EXIT_KEYRING_FILE);
            set.replicas.insert(0, keys);
            set.legacy = true;
        }
        set.check_distinct()?;
        Ok(set)
    }

    fn check_distinct(&self) -> Result<(), KeySetError> {
        let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
        for (ordinal, keys) in &self.replicas {
            if let Some(first) = seen.insert(&keys.peer_id, *ordinal) {
                return Err(KeySetError::SharedIdentity {
                    first,
                    second: *ordinal,
                    peer_id: keys.peer_id.clone(),
                });
            }
        }
        Ok(())
    }

    /// Whether ordinal 0 came from the files without an ordinal (the Secret needs rewriting).
    #[must_use]
    pub fn is_legacy(&self) -> bool {
        self.legacy
    }

    /// Creates the keys of every ordinal below `replicas` that has none (identities are never
    /// replaced); returns the ordinals created.
    pub fn fill(&mut self, replicas: u32, now: u64) -> Result<Vec<u32>, KeyError> {
        let mut created = Vec::new();
        for ordinal in 0..replicas {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.replicas.entry(ordinal) {
                slot.insert(ReplicaKeys::generate(now)?);
                created.push(ordinal);
            }
        }
        // Fresh identities are distinct with overwhelming probability; a collision would
        // be a broken random number generator.
        self.check_distinct().map_err(|_| KeyError::Random)?;
        Ok(created)
    }

    /// The keys of `ordinal`.
    #[must_use]
    pub fn get(&self, ordinal: u32) -> Option<&ReplicaKeys> {
        self.replicas.get(&ordinal)
    }

    /// Every ordinal's keys, by ordinal (kept ones above the replica count included).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &ReplicaKeys)> {
        self.replicas.iter().map(|(o, k)| (*o, k))
    }

    /// Whether some ordinal's current OHTTP key is `interval` seconds old at `now`.
    #[must_use]
    pub fn rotation_due(&self, now: u64, interval: u64) -> bool {
        self.replicas
            .values()
            .any(|k| k.keyring.rotation_due(now, interval))
    }

    /// Seconds until the first ordinal's rotation is due (`u64::MAX` with no ordinal).
    #[must_use]
    pub fn seconds_until_rotation(&self, now: u64, interval: u64) -> u64 {
        self.replicas
            .values()
            .map(|k| k.keyring.seconds_until_rotation(now, interval))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Rotates every ordinal's keyring (kept ordinals too, so a replica scaled back up never
    /// starts with a stale key): a new current key, the previous one kept for the overlap.
    pub fn rotate_all(&mut self, now: u64) -> Result<(), KeyError> {
        for keys in self.replicas.values_mut() {
            keys.keyring.rotate(now)?;
        }
        Ok(())
    }

    /// The Secret data: each ordinal's two files, and the keys that are not the operator's.
    #[must_use]
    pub fn encode(&self) -> BTreeMap<String, ByteString> {
        let mut data = self.other.clone();
        for (ordinal, keys) in &self.replicas {
            data.insert(identity_key(*ordinal), ByteString(keys.identity.to_vec()));
            data.insert(
                keyring_key(*ordinal),
                ByteString(keys.keyring.encode().to_vec()),
            );
        }
        data
    }
}

impl Default for ExitKeySet {
    fn default() -> Self {
        Self::new()
    }
}

/// The ordinal of a Secret key that names an ordinal's file (`<n>.exit_identity.key` or
/// `<n>.ohttp_keys.json`, `n` written as the operator writes it).
fn ordinal_of(key: &str) -> Option<u32> {
    let (number, file) = key.split_once('.')?;
    if file != EXIT_IDENTITY_FILE && file != EXIT_KEYRING_FILE {
        return None;
    }
    let ordinal: u32 = number.parse().ok()?;
    (ordinal.to_string() == number).then_some(ordinal)
}

/// Reads the identity and keyring stored under `names`; both must be there.
fn read_pair(
    data: &BTreeMap<String, ByteString>,
    names: (&str, &str),
) -> Result<ReplicaKeys, KeySetError> {
    match (data.get(names.0), data.get(names.1)) {
        (Some(identity), Some(keyring)) => ReplicaKeys::read(&identity.0, &keyring.0, names),
        (Some(_), None) | (None, None) => Err(KeySetError::Incomplete {
            present: names.0.to_owned(),
            missing: names.1.to_owned(),
        }),
        (None, Some(_)) => Err(KeySetError::Incomplete {
            present: names.1.to_owned(),
            missing: names.0.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &[u8]) -> ByteString {
        ByteString(b.to_vec())
    }

    #[test]
    fn ordinals_fill_encode_and_read_back() {
        let mut set = ExitKeySet::new();
        assert_eq!(set.fill(3, 100).unwrap(), vec![0, 1, 2]);
        assert_eq!(
            set.fill(3, 200).unwrap(),
            Vec::<u32>::new(),
            "nothing replaced"
        );
        let data = set.encode();
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "0.exit_identity.key",
                "0.ohttp_keys.json",
                "1.exit_identity.key",
                "1.ohttp_keys.json",
                "2.exit_identity.key",
                "2.ohttp_keys.json"
            ]
        );
        let read = ExitKeySet::parse(&data).unwrap();
        assert!(!read.is_legacy());
        assert_eq!(read.encode(), data, "a read set writes back the same bytes");
        let peers: BTreeSet<&str> = read.iter().map(|(_, k)| k.peer_id.as_str()).collect();
        assert_eq!(peers.len(), 3, "one identity per ordinal");
        for (ordinal, keys) in read.iter() {
            assert_eq!(keys.peer_id, set.get(ordinal).unwrap().peer_id);
        }
    }

    #[test]
    fn scaling_down_and_up_keeps_every_identity() {
        let mut set = ExitKeySet::new();
        set.fill(3, 1).unwrap();
        let before: Vec<String> = set.iter().map(|(_, k)| k.peer_id.clone()).collect();
        // Scaling to 1 fills nothing and drops nothing.
        assert!(set.fill(1, 2).unwrap().is_empty());
        let mut read = ExitKeySet::parse(&set.encode()).unwrap();
        assert_eq!(read.fill(4, 3).unwrap(), vec![3]);
        let after: Vec<String> = read.iter().map(|(_, k)| k.peer_id.clone()).collect();
        assert_eq!(after[..3], before[..]);
    }

    #[test]
    fn the_single_identity_of_an_older_secret_becomes_ordinal_0() {
        let identity = keys::new_identity().unwrap();
        let ring = Keyring::generate(1, 10).unwrap();
        let data = BTreeMap::from([
            (EXIT_IDENTITY_FILE.to_owned(), bytes(&identity)),
            (EXIT_KEYRING_FILE.to_owned(), bytes(&ring.encode())),
            ("notes".to_owned(), bytes(b"kept")),
        ]);
        let mut set = ExitKeySet::parse(&data).unwrap();
        assert!(set.is_legacy());
        assert_eq!(
            set.get(0).unwrap().peer_id,
            keys::peer_id(&identity).unwrap().to_string()
        );
        set.fill(2, 20).unwrap();
        let written = set.encode();
        assert_eq!(written["0.exit_identity.key"].0, *identity);
        assert_eq!(written["0.ohttp_keys.json"].0, ring.encode().to_vec());
        assert!(
            !written.contains_key(EXIT_IDENTITY_FILE),
            "moved, not copied"
        );
        assert_eq!(written["notes"].0, b"kept", "keys that are not ours stay");
        assert!(!ExitKeySet::parse(&written).unwrap().is_legacy());
    }

    #[test]
    fn files_without_an_ordinal_beside_ordinal_0_are_left_alone() {
        let mut set = ExitKeySet::new();
        set.fill(1, 1).unwrap();
        let mut data = set.encode();
        data.insert(EXIT_IDENTITY_FILE.to_owned(), bytes(b"whatever"));
        let read = ExitKeySet::parse(&data).unwrap();
        assert!(!read.is_legacy());
        assert_eq!(read.encode(), data);
    }

    #[test]
    fn broken_incomplete_and_shared_identities_are_refused() {
        let mut set = ExitKeySet::new();
        set.fill(2, 1).unwrap();
        let good = set.encode();

        let mut junk = good.clone();
        junk.insert(identity_key(1), bytes(b"junk"));
        let error = ExitKeySet::parse(&junk).unwrap_err();
        assert!(
            matches!(&error, KeySetError::Invalid { key, error: KeyError::InvalidIdentity } if key == "1.exit_identity.key"),
            "{error}"
        );

        let mut bad_ring = good.clone();
        bad_ring.insert(keyring_key(0), bytes(b"{}"));
        assert!(matches!(
            ExitKeySet::parse(&bad_ring),
            Err(KeySetError::Invalid {
                error: KeyError::InvalidKeyring(_),
                ..
            })
        ));

        let mut half = good.clone();
        half.remove(&keyring_key(1));
        let error = ExitKeySet::parse(&half).unwrap_err();
        assert_eq!(
            error.to_string(),
            "1.exit_identity.key is there but 1.ohttp_keys.json is not"
        );
        let legacy_half = BTreeMap::from([(EXIT_KEYRING_FILE.to_owned(), bytes(b"{}"))]);
        assert!(matches!(
            ExitKeySet::parse(&legacy_half),
            Err(KeySetError::Incomplete { .. })
        ));

        let mut shared = good.clone();
        shared.insert(identity_key(1), good[&identity_key(0)].clone());
        let error = ExitKeySet::parse(&shared).unwrap_err();
        assert!(
            matches!(
                error,
                KeySetError::SharedIdentity {
                    first: 0,
                    second: 1,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn only_canonical_ordinal_names_are_ordinals() {
        assert_eq!(ordinal_of("0.exit_identity.key"), Some(0));
        assert_eq!(ordinal_of("17.ohttp_keys.json"), Some(17));
        assert_eq!(ordinal_of("01.ohttp_keys.json"), None);
        assert_eq!(ordinal_of("+1.ohttp_keys.json"), None);
        assert_eq!(ordinal_of("a.ohttp_keys.json"), None);
        assert_eq!(ordinal_of("1.other.json"), None);
        assert_eq!(ordinal_of(EXIT_IDENTITY_FILE), None);
    }

    #[test]
    fn rotation_is_due_when_any_ordinal_is_and_rotates_them_all() {
        let mut set = ExitKeySet::new();
        set.fill(1, 100).unwrap();
        set.fill(2, 5000).unwrap();
        assert!(!set.rotation_due(3000, 3600));
        assert_eq!(set.seconds_until_rotation(3000, 3600), 700);
        assert!(set.rotation_due(3700, 3600), "ordinal 0 is old enough");
        let before = set.encode();
        set.rotate_all(3700).unwrap();
        for ordinal in 0..2 {
            let keys = set.get(ordinal).unwrap();
            assert_eq!(keys.keyring.public_keys().len(), 2);
            assert_ne!(
                before[&keyring_key(ordinal)].0,
                keys.keyring.encode().to_vec(),
                "ordinal {ordinal} rotated"
            );
            assert_eq!(
                before[&identity_key(ordinal)].0,
                set.encode()[&identity_key(ordinal)].0,
                "identities never change"
            );
        }
        assert_eq!(ExitKeySet::new().seconds_until_rotation(0, 1), u64::MAX);
    }
}
