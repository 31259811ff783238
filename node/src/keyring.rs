//! The exit's OHTTP keyring: the current key and, during a rotation overlap, the previous one,
//! each stored as a 32-byte seed from which the HPKE key pair is derived (RFC 9180
//! `DeriveKeyPair`). The file is JSON, mode 0600.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokengo_proto::key_config::{KeyConfig, KeyPair};
use zeroize::Zeroizing;

use crate::data_dir::{self, DataDirError};

/// Why a keyring could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    Io(#[from] DataDirError),
    /// The file is not a TokenGo OHTTP keyring.
    #[error(
        "{path} is not a TokenGo OHTTP keyring ({reason}); create one with `tokengo keygen --type ohttp`"
    )]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The system random number generator failed.
    #[error("system random number generator unavailable")]
    Random,
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
    /// Hex of the 32-byte seed.
    seed: String,
    /// Unix seconds.
    created_at: u64,
}

/// One key of the ring.
struct Entry {
    key_id: u8,
    seed: Zeroizing<[u8; 32]>,
    created_at: u64,
}

/// Current key first, then at most one previous key.
pub struct Keyring {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| e.key_id))
            .finish()
    }
}

impl Keyring {
    /// A new ring holding one fresh key with `key_id`.
    pub fn generate(key_id: u8, now: u64) -> Result<Self, KeyringError> {
        Ok(Self {
            entries: vec![Entry {
                key_id,
                seed: random_seed()?,
                created_at: now,
            }],
        })
    }

    /// Loads the ring at `path`, or creates and saves a new one. Returns whether it was created.
    pub fn load_or_create(path: &Path, now: u64) -> Result<(Self, bool), KeyringError> {
        if let Some(bytes) = data_dir::read_if_exists(path)? {
            return Self::decode(path, &bytes).map(|ring| (ring, false));
        }
        let ring = Self::generate(1, now)?;
        data_dir::write_secret_new(path, &ring.encode())?;
        Ok((ring, true))
    }

    /// Adds a fresh current key; the old current key stays as the previous one (so requests
    /// encrypted to it during the overlap still open); anything older is dropped.
    pub fn rotate(&mut self, now: u64) -> Result<(), KeyringError> {
        let used: Vec<u8> = self.entries.iter().map(|e| e.key_id).collect();
        let current = self.entries.first().map_or(0, |e| e.key_id);
        let key_id = (1..=255u8)
            .map(|step| current.wrapping_add(step))
            .find(|id| !used.contains(id))
            .unwrap_or(current.wrapping_add(1));
        self.entries.truncate(1);
        self.entries.insert(
            0,
            Entry {
                key_id,
                seed: random_seed()?,
                created_at: now,
            },
        );
        Ok(())
    }

    /// Saves the ring to a new file; fails if one exists (never destroys a key).
    pub fn save_new(&self, path: &Path) -> Result<(), KeyringError> {
        Ok(data_dir::write_secret_new(path, &self.encode())?)
    }

    /// Saves the ring, replacing the file atomically.
    pub fn save(&self, path: &Path) -> Result<(), KeyringError> {
        Ok(data_dir::replace_secret(path, &self.encode())?)
    }

    /// The HPKE key pairs, current first.
    #[must_use]
    pub fn key_pairs(&self) -> Vec<KeyPair> {
        self.entries
            .iter()
            .map(|e| KeyPair::from_seed(e.key_id, &e.seed))
            .collect()
    }

    /// The public key configurations, current first.
    #[must_use]
    pub fn configs(&self) -> Vec<KeyConfig> {
        self.key_pairs().iter().map(KeyPair::config).collect()
    }

    /// Key id and creation time (Unix seconds) of each key, current first.
    #[must_use]
    pub fn key_ids(&self) -> Vec<(u8, u64)> {
        self.entries
            .iter()
            .map(|e| (e.key_id, e.created_at))
            .collect()
    }

    /// Unix time the current key was created.
    #[must_use]
    pub fn current_created_at(&self) -> u64 {
        self.entries.first().map_or(0, |e| e.created_at)
    }

    fn encode(&self) -> Vec<u8> {
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
        // Serializing plain structs of strings and integers cannot fail.
        let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
        out.push(b'\n');
        out
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Self, KeyringError> {
        let invalid = |reason: String| KeyringError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let file: KeyringFile =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if file.version != 1 {
            return Err(invalid(format!("unsupported version {}", file.version)));
        }
        if file.keys.is_empty() || file.keys.len() > 2 {
            return Err(invalid("must hold one or two keys".into()));
        }
        if file.keys.len() == 2 && file.keys[0].key_id == file.keys[1].key_id {
            return Err(invalid("key ids must be distinct".into()));
        }
        let entries = file
            .keys
            .into_iter()
            .map(|k| {
                let raw = Zeroizing::new(
                    hex::decode(&k.seed).map_err(|_| invalid("seed is not hex".into()))?,
                );
                let seed: [u8; 32] = raw
                    .as_slice()
                    .try_into()
                    .map_err(|_| invalid("seed must be 32 bytes".into()))?;
                Ok(Entry {
                    key_id: k.key_id,
                    seed: Zeroizing::new(seed),
                    created_at: k.created_at,
                })
            })
            .collect::<Result<Vec<_>, KeyringError>>()?;
        Ok(Self { entries })
    }
}

fn random_seed() -> Result<Zeroizing<[u8; 32]>, KeyringError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice()).map_err(|_| KeyringError::Random)?;
    Ok(seed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_rotates_with_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ohttp_keys.json");
        let (mut ring, created) = Keyring::load_or_create(&path, 100).unwrap();
        assert!(created);
        let first = ring.configs();
        let (again, created) = Keyring::load_or_create(&path, 200).unwrap();
        assert!(!created);
        assert_eq!(again.configs(), first);

        ring.rotate(300).unwrap();
        let rotated = ring.configs();
        assert_eq!(rotated.len(), 2);
        assert_eq!(rotated[1], first[0], "previous key kept for the overlap");
        assert_ne!(rotated[0].key_id, rotated[1].key_id);
        ring.rotate(400).unwrap();
        let twice = ring.configs();
        assert_eq!(twice.len(), 2);
        assert_eq!(twice[1], rotated[0]);
        ring.save(&path).unwrap();
        let (reloaded, _) = Keyring::load_or_create(&path, 500).unwrap();
        assert_eq!(reloaded.configs(), twice);
        assert_eq!(reloaded.current_created_at(), 400);
    }

    #[test]
    fn rejects_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        for text in [
            "nope",
            r#"{"version":2,"keys":[]}"#,
            r#"{"version":1,"keys":[]}"#,
            r#"{"version":1,"keys":[{"key_id":1,"seed":"00","created_at":0}]}"#,
        ] {
            std::fs::write(&path, text).unwrap();
            let error = Keyring::load_or_create(&path, 0).unwrap_err().to_string();
            assert!(error.contains("keygen --type ohttp"), "{error}");
        }
    }
}
