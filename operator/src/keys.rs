//! Key material the operator creates for nodes, in exactly the formats the node reads from its
//! data directory: `*_identity.key` (libp2p protobuf-encoded Ed25519) and `ohttp_keys.json` (the
//! exit's keyring of 32-byte HPKE seeds, current first, previous second during the overlap).
//! Pure: generation takes randomness from the OS, everything else is a function of bytes.

use libp2p_identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};
use tokengo_proto::key_config::{KeyConfig, KeyPair};
use zeroize::Zeroizing;

/// Why key material could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The OS random number generator failed.
    #[error("system random number generator unavailable")]
    Random,
    /// An identity key is not a libp2p protobuf-encoded Ed25519 key.
    #[error("not a TokenGo identity key (libp2p protobuf Ed25519)")]
    InvalidIdentity,
    /// A keyring is not in the node's `ohttp_keys.json` format.
    #[error("not a TokenGo OHTTP keyring: {0}")]
    InvalidKeyring(String),
}

/// A new Ed25519 identity, encoded as the node stores it.
pub fn new_identity() -> Result<Zeroizing<Vec<u8>>, KeyError> {
    Keypair::generate_ed25519()
        .to_protobuf_encoding()
        .map(Zeroizing::new)
        .map_err(|_| KeyError::InvalidIdentity)
}

/// The PeerId of an encoded identity key; only Ed25519 keys are accepted, as the node does.
pub fn peer_id(encoded: &[u8]) -> Result<PeerId, KeyError> {
    let key = Keypair::from_protobuf_encoding(encoded).map_err(|_| KeyError::InvalidIdentity)?;
    let public = key.public();
    key.try_into_ed25519()
        .map_err(|_| KeyError::InvalidIdentity)?;
    Ok(public.to_peer_id())
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    version: u32,
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    key_id: u8,
    seed: String,
    created_at: u64,
}

/// One key of the ring.
struct Entry {
    key_id: u8,
    seed: Zeroizing<[u8; 32]>,
    created_at: u64,
}

/// The public facts of one key: what the exit's status publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// OHTTP key id.
    pub key_id: u8,
    /// RFC 9458 key configuration.
    pub config: KeyConfig,
    /// Unix seconds.
    pub created_at: u64,
}

/// The exit's OHTTP keyring: current key first, then at most one previous key.
pub struct Keyring {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Keyring {
    // Seeds are secret: only key ids are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| e.key_id))
            .finish()
    }
}

impl Keyring {
    /// A ring with one fresh key, id 1 (what the node creates on its own first start).
    pub fn generate(now: u64) -> Result<Self, KeyError> {
        Ok(Self {
            entries: vec![Entry {
                key_id: 1,
                seed: random_seed()?,
                created_at: now,
            }],
        })
    }

    /// Reads the node's `ohttp_keys.json` format, with the node's checks.
    pub fn parse(bytes: &[u8]) -> Result<Self, KeyError> {
        let invalid = |reason: &str| KeyError::InvalidKeyring(reason.to_owned());
        let file: KeyringFile =
            serde_json::from_slice(bytes).map_err(|e| KeyError::InvalidKeyring(e.to_string()))?;
        if file.version != 1 {
            return Err(invalid("unsupported version"));
        }
        if file.keys.is_empty() || file.keys.len() > 2 {
            return Err(invalid("must hold one or two keys"));
        }
        if file.keys.len() == 2 && file.keys[0].key_id == file.keys[1].key_id {
            return Err(invalid("key ids must be distinct"));
        }
        let entries = file
            .keys
            .into_iter()
            .map(|k| {
                let raw =
                    Zeroizing::new(hex::decode(&k.seed).map_err(|_| invalid("seed is not hex"))?);
                let seed: [u8; 32] = raw
                    .as_slice()
                    .try_into()
                    .map_err(|_| invalid("seed must be 32 bytes"))?;
                Ok(Entry {
                    key_id: k.key_id,
                    seed: Zeroizing::new(seed),
                    created_at: k.created_at,
                })
            })
            .collect::<Result<Vec<_>, KeyError>>()?;
        Ok(Self { entries })
    }

    /// The node's `ohttp_keys.json` bytes.
    #[must_use]
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let file = KeyringFile {
            version: 1,
            keys: self
                .entries
                .iter()
                .map(|e| StoredKey {
                    key_id: e.key_id,
                    seed: hex::encode(*e.seed),
                    created_at: e.created_at,
                })
                .collect(),
        };
        // Plain structs of strings and integers always serialize.
        let mut out = Zeroizing::new(serde_json::to_vec_pretty(&file).unwrap_or_default());
        out.push(b'\n');
        out
    }

    /// Makes a fresh key current; the old current key stays as the previous one (requests
    /// encrypted to it during the overlap still open); anything older is dropped. The new key
    /// id is the next one not in use, as the node's own rotation picks it.
    pub fn rotate(&mut self, now: u64) -> Result<(), KeyError> {
        let used: Vec<u8> = self.entries.iter().map(|e| e.key_id).collect();
        let current = self.entries.first().map_or(0, |e| e.key_id);
        let key_id = (1..=255u8)
            .map(|step| current.wrapping_add(step))
            .find(|id| !used.contains(id))
            .unwrap_or(current.wrapping_add(1));
        let seed = random_seed()?;
        self.entries.truncate(1);
        self.entries.insert(
            0,
            Entry {
                key_id,
                seed,
                created_at: now,
            },
        );
        Ok(())
    }

    /// Unix time the current key was created.
    #[must_use]
    pub fn current_created_at(&self) -> u64 {
        self.entries.first().map_or(0, |e| e.created_at)
    }

    /// Whether the current key is older than `interval_secs` at `now`.
    #[must_use]
    pub fn rotation_due(&self, now: u64, interval_secs: u64) -> bool {
        now.saturating_sub(self.current_created_at()) >= interval_secs
    }

    /// Seconds until the current key is due for rotation (0 when due).
    #[must_use]
    pub fn seconds_until_rotation(&self, now: u64, interval_secs: u64) -> u64 {
        (self.current_created_at().saturating_add(interval_secs)).saturating_sub(now)
    }

    /// The public facts of every key, current first.
    #[must_use]
    pub fn public_keys(&self) -> Vec<PublicKey> {
        self.entries
            .iter()
            .map(|e| PublicKey {
                key_id: e.key_id,
                config: KeyPair::from_seed(e.key_id, &e.seed).config(),
                created_at: e.created_at,
            })
            .collect()
    }
}

fn random_seed() -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice()).map_err(|_| KeyError::Random)?;
    Ok(seed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_names_a_peer() {
        let key = new_identity().unwrap();
        let peer = peer_id(&key).unwrap();
        assert_eq!(peer_id(&key).unwrap(), peer);
        assert!(peer.to_string().starts_with("12D3Koo"), "{peer}");
        assert!(matches!(peer_id(b"junk"), Err(KeyError::InvalidIdentity)));
        let other = new_identity().unwrap();
        assert_ne!(peer_id(&other).unwrap(), peer);
    }

    #[test]
    fn keyring_rotates_with_overlap_and_round_trips() {
        let mut ring = Keyring::generate(100).unwrap();
        let first = ring.public_keys();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].key_id, 1);
        assert!(!ring.rotation_due(150, 100));
        assert_eq!(ring.seconds_until_rotation(150, 100), 50);
        assert!(ring.rotation_due(200, 100));
        ring.rotate(200).unwrap();
        let second = ring.public_keys();
        assert_eq!(second.len(), 2);
        assert_eq!(second[0].key_id, 2);
        assert_eq!(
            second[1], first[0],
            "the previous key is kept for the overlap"
        );
        ring.rotate(300).unwrap();
        let third = ring.public_keys();
        assert_eq!(third.len(), 2);
        assert_eq!(third[1], second[0]);
        assert_eq!(third[0].key_id, 3);
        let reparsed = Keyring::parse(&ring.encode()).unwrap();
        assert_eq!(reparsed.public_keys(), third);
        assert_eq!(reparsed.current_created_at(), 300);
    }

    #[test]
    fn key_ids_wrap_and_skip_the_previous_id() {
        let text = format!(
            r#"{{"version":1,"keys":[{{"key_id":255,"seed":"{}","created_at":1}},{{"key_id":1,"seed":"{}","created_at":0}}]}}"#,
            "11".repeat(32),
            "22".repeat(32)
        );
        let mut ring = Keyring::parse(text.as_bytes()).unwrap();
        ring.rotate(2).unwrap();
        let ids: Vec<u8> = ring.public_keys().iter().map(|k| k.key_id).collect();
        // 255 + 1 wraps to 0, a valid OHTTP key id (the node's own rotation does the same).
        assert_eq!(ids, vec![0, 255]);
    }

    #[test]
    fn broken_keyrings_are_refused() {
        for text in [
            "nope".to_owned(),
            r#"{"version":2,"keys":[]}"#.to_owned(),
            r#"{"version":1,"keys":[]}"#.to_owned(),
            r#"{"version":1,"keys":[{"key_id":1,"seed":"zz","created_at":0}]}"#.to_owned(),
            format!(
                r#"{{"version":1,"keys":[{{"key_id":1,"seed":"{0}","created_at":0}},{{"key_id":1,"seed":"{0}","created_at":0}}]}}"#,
                "00".repeat(32)
            ),
        ] {
            assert!(Keyring::parse(text.as_bytes()).is_err(), "{text}");
        }
    }

    /// The node itself loads what the operator writes: same key configurations.
    #[test]
    fn the_node_reads_the_operators_keyring() {
        let mut ring = Keyring::generate(10).unwrap();
        ring.rotate(20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ohttp_keys.json");
        std::fs::write(&path, ring.encode()).unwrap();
        let (loaded, created) = tokengo::keyring::Keyring::load_or_create(&path, 30).unwrap();
        assert!(!created);
        let ours: Vec<KeyConfig> = ring.public_keys().into_iter().map(|k| k.config).collect();
        assert_eq!(loaded.configs(), ours);

        let identity = new_identity().unwrap();
        let id_path = dir.path().join("exit_identity.key");
        std::fs::write(&id_path, &*identity).unwrap();
        let (node_key, created) = tokengo::identity::load_or_create(&id_path).unwrap();
        assert!(!created);
        assert_eq!(
            tokengo::identity::peer_id(&node_key),
            peer_id(&identity).unwrap()
        );
    }
}
