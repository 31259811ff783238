//! The exit's OHTTP keyring format (`ohttp_keys.json`, also the operator's key Secret): the
//! current key and, during a rotation overlap, the previous one, each a 32-byte seed from which
//! the HPKE key pair is derived (RFC 9180 `DeriveKeyPair`), plus the rotation rule.
//!
//! The single definition shared by the node (which keeps it in a 0600 file) and the Kubernetes
//! operator (which keeps it in a Secret). No I/O: bytes in, bytes out. Fresh seeds come from
//! the OS random number generator (`getrandom`).
//!
//! The encoding is pretty-printed JSON with a trailing newline:
//! `{"version": 1, "keys": [{"key_id": u8, "seed": "<64 hex>", "created_at": unix_secs}, ..]}`,
//! current key first. Unknown fields are refused.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::key_config::{KeyConfig, KeyPair};

/// The only format version.
const VERSION: u32 = 1;
/// Length of a key seed.
const SEED_LEN: usize = 32;
/// Enough for the pretty encoding of two keys with maximal numbers (about 370 bytes), so the
/// encoder never reallocates and leaves no unzeroized copy of the seeds behind.
const ENCODED_CAPACITY: usize = 512;

/// Why a keyring could not be read or a key made.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The OS random number generator failed.
    #[error("system random number generator unavailable")]
    Random,
    /// Not JSON of the keyring's shape (syntax, missing, duplicate or unknown fields, a key id
    /// outside 0..=255).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A `version` other than 1.
    #[error("unsupported version {0}")]
    UnsupportedVersion(u32),
    /// Not one or two keys; the count is given.
    #[error("must hold one or two keys, not {0}")]
    KeyCount(usize),
    /// Both keys have the same key id, so a request's key id could not pick one.
    #[error("key ids must be distinct (both are {0})")]
    DuplicateKeyId(u8),
    /// A seed is not hexadecimal.
    #[error("seed is not hex")]
    SeedNotHex,
    /// A seed does not decode to 32 bytes.
    #[error("seed must be 32 bytes")]
    SeedLength,
}

/// The stored form of the ring.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    version: u32,
    keys: Vec<StoredKey>,
}

/// The stored form of one key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    key_id: u8,
    /// Hex of the 32-byte seed.
    seed: SeedHex,
    /// Unix seconds.
    created_at: u64,
}

/// A seed's hex text, wiped when dropped.
struct SeedHex(Zeroizing<String>);

impl Serialize for SeedHex {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SeedHex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|text| Self(Zeroizing::new(text)))
    }
}

/// One key of the ring.
struct Entry {
    key_id: u8,
    seed: Zeroizing<[u8; SEED_LEN]>,
    created_at: u64,
}

/// The public facts of one key: what the exit publishes about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// OHTTP key id.
    pub key_id: u8,
    /// RFC 9458 key configuration.
    pub config: KeyConfig,
    /// Unix seconds.
    pub created_at: u64,
}

/// The exit's OHTTP keyring: current key first, then at most one previous key. Always holds
/// one or two keys with distinct ids.
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
    /// A new ring holding one fresh key with `key_id`, created at `now` (Unix seconds). The node
    /// and the operator start with key id 1.
    pub fn generate(key_id: u8, now: u64) -> Result<Self, KeyringError> {
        Ok(Self {
            entries: vec![Entry {
                key_id,
                seed: random_seed()?,
                created_at: now,
            }],
        })
    }

    /// Reads the encoding, refusing anything but version 1 with one or two well-formed keys of
    /// distinct ids.
    pub fn parse(bytes: &[u8]) -> Result<Self, KeyringError> {
        let file: KeyringFile = serde_json::from_slice(bytes)?;
        if file.version != VERSION {
            return Err(KeyringError::UnsupportedVersion(file.version));
        }
        match file.keys.as_slice() {
            [_] => {}
            [a, b] if a.key_id == b.key_id => return Err(KeyringError::DuplicateKeyId(a.key_id)),
            [_, _] => {}
            keys => return Err(KeyringError::KeyCount(keys.len())),
        }
        let entries = file
            .keys
            .into_iter()
            .map(|k| {
                let raw =
                    Zeroizing::new(hex::decode(&*k.seed.0).map_err(|_| KeyringError::SeedNotHex)?);
                let seed: [u8; SEED_LEN] = raw
                    .as_slice()
                    .try_into()
                    .map_err(|_| KeyringError::SeedLength)?;
                Ok(Entry {
                    key_id: k.key_id,
                    seed: Zeroizing::new(seed),
                    created_at: k.created_at,
                })
            })
            .collect::<Result<Vec<_>, KeyringError>>()?;
        Ok(Self { entries })
    }

    /// The encoding: pretty-printed JSON and a trailing newline.
    #[must_use]
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let file = KeyringFile {
            version: VERSION,
            keys: self
                .entries
                .iter()
                .map(|e| StoredKey {
                    key_id: e.key_id,
                    seed: SeedHex(Zeroizing::new(hex::encode(e.seed.as_slice()))),
                    created_at: e.created_at,
                })
                .collect(),
        };
        let mut out = Zeroizing::new(Vec::with_capacity(ENCODED_CAPACITY));
        // Plain structs of strings and integers written to a Vec cannot fail.
        if serde_json::to_writer_pretty(&mut *out, &file).is_err() {
            out.clear();
        }
        out.push(b'\n');
        out
    }

    /// Makes a fresh key current; the old current key stays as the previous one (requests
    /// encrypted to it during the overlap still open); anything older is dropped. The new key
    /// id is the next one after the current id (wrapping 255 to 0, a valid OHTTP key id) that
    /// is not in use. On failure the ring is unchanged.
    pub fn rotate(&mut self, now: u64) -> Result<(), KeyringError> {
        let seed = random_seed()?;
        let current = self.entries.first().map_or(0, |e| e.key_id);
        let key_id = (1..=u8::MAX)
            .map(|step| current.wrapping_add(step))
            .find(|id| self.entries.iter().all(|e| e.key_id != *id))
            .unwrap_or(current.wrapping_add(1));
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

    /// Drops the previous key (its overlap ended): requests encrypted to it are then
    /// answered "key unknown". A ring with one key is unchanged.
    pub fn retire_previous(&mut self) {
        self.entries.truncate(1);
    }

    /// Whether a previous key is still held.
    #[must_use]
    pub fn has_previous(&self) -> bool {
        self.entries.len() > 1
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

    /// Whether the current key is at least `interval_secs` old at `now`.
    #[must_use]
    pub fn rotation_due(&self, now: u64, interval_secs: u64) -> bool {
        now.saturating_sub(self.current_created_at()) >= interval_secs
    }

    /// Seconds until the current key is due for rotation (0 when due).
    #[must_use]
    pub fn seconds_until_rotation(&self, now: u64, interval_secs: u64) -> u64 {
        self.current_created_at()
            .saturating_add(interval_secs)
            .saturating_sub(now)
    }
}

fn random_seed() -> Result<Zeroizing<[u8; SEED_LEN]>, KeyringError> {
    let mut seed = Zeroizing::new([0u8; SEED_LEN]);
    getrandom::fill(seed.as_mut_slice()).map_err(|_| KeyringError::Random)?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[(u16, &str, u64)]) -> String {
        let keys: Vec<String> = keys
            .iter()
            .map(|(id, seed, at)| format!(r#"{{"key_id":{id},"seed":"{seed}","created_at":{at}}}"#))
            .collect();
        format!(r#"{{"version":1,"keys":[{}]}}"#, keys.join(","))
    }

    #[test]
    fn encoding_is_byte_exact() {
        let (a, b) = ("11".repeat(32), "22".repeat(32));
        let parsed = Keyring::parse(ring(&[(2, &a, 20), (1, &b, 10)]).as_bytes()).unwrap();
        let expected = format!(
            "{{\n  \"version\": 1,\n  \"keys\": [\n    {{\n      \"key_id\": 2,\n      \
             \"seed\": \"{a}\",\n      \"created_at\": 20\n    }},\n    {{\n      \
             \"key_id\": 1,\n      \"seed\": \"{b}\",\n      \"created_at\": 10\n    }}\n  ]\n}}\n"
        );
        assert_eq!(
            String::from_utf8(parsed.encode().to_vec()).unwrap(),
            expected
        );
        assert_eq!(parsed.key_ids(), vec![(2, 20), (1, 10)]);
        assert_eq!(
            parsed.configs()[1],
            KeyPair::from_seed(1, &[0x22; 32]).config()
        );
        // The biggest possible encoding fits the buffer reserved for it.
        let max = Keyring::parse(ring(&[(255, &a, u64::MAX), (254, &b, u64::MAX)]).as_bytes())
            .unwrap()
            .encode();
        assert!(max.len() <= ENCODED_CAPACITY, "{}", max.len());
    }

    #[test]
    fn rotates_with_overlap_and_round_trips() {
        let mut ring = Keyring::generate(1, 100).unwrap();
        let first = ring.public_keys();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].key_id, 1);
        assert_eq!(first[0].config, ring.configs()[0]);
        let reparsed = Keyring::parse(&ring.encode()).unwrap();
        assert_eq!(reparsed.public_keys(), first);

        assert!(!ring.rotation_due(150, 100));
        assert_eq!(ring.seconds_until_rotation(150, 100), 50);
        assert!(ring.rotation_due(200, 100));
        assert_eq!(ring.seconds_until_rotation(250, 100), 0);
        ring.rotate(200).unwrap();
        let second = ring.public_keys();
        assert_eq!(second.len(), 2);
        assert_eq!(second[0].key_id, 2);
        assert_eq!(
            second[1], first[0],
            "the previous key is kept for the overlap"
        );
        assert!(!ring.rotation_due(250, 100));
        assert!(ring.has_previous());

        ring.rotate(300).unwrap();
        let third = ring.public_keys();
        assert_eq!(third.len(), 2);
        assert_eq!(third[1], second[0], "the oldest key is dropped");
        assert_eq!(third[0].key_id, 3);
        let reparsed = Keyring::parse(&ring.encode()).unwrap();
        assert_eq!(reparsed.public_keys(), third);
        assert_eq!(reparsed.current_created_at(), 300);
        assert_eq!(reparsed.key_ids(), vec![(3, 300), (2, 200)]);

        ring.retire_previous();
        assert!(!ring.has_previous());
        assert_eq!(ring.key_ids(), vec![(3, 300)]);
        assert_eq!(ring.public_keys()[0], third[0]);
        ring.retire_previous();
        assert_eq!(
            ring.key_ids(),
            vec![(3, 300)],
            "the current key is never dropped"
        );
    }

    #[test]
    fn key_ids_wrap_and_skip_the_previous_id() {
        let (a, b) = ("11".repeat(32), "22".repeat(32));
        // 255 + 1 wraps to 0, a valid OHTTP key id.
        let mut wraps = Keyring::parse(ring(&[(255, &a, 1), (1, &b, 0)]).as_bytes()).unwrap();
        wraps.rotate(2).unwrap();
        assert_eq!(wraps.key_ids(), vec![(0, 2), (255, 1)]);
        // The next id is taken by the previous key: skip it.
        let mut skips = Keyring::parse(ring(&[(4, &a, 1), (5, &b, 0)]).as_bytes()).unwrap();
        skips.rotate(2).unwrap();
        assert_eq!(skips.key_ids(), vec![(6, 2), (4, 1)]);
        let mut both = Keyring::parse(ring(&[(255, &a, 1), (0, &b, 0)]).as_bytes()).unwrap();
        both.rotate(2).unwrap();
        assert_eq!(both.key_ids(), vec![(1, 2), (255, 1)]);
    }

    #[test]
    fn broken_keyrings_are_refused() {
        let refused = |text: &str| Keyring::parse(text.as_bytes()).unwrap_err();
        let seed = "00".repeat(32);
        let json = |text: &str| matches!(refused(text), KeyringError::Json(_));
        assert!(json("nope"));
        assert!(
            json(r#"{"version":1,"keys":[],"extra":true}"#),
            "unknown field"
        );
        assert!(json(&format!(
            r#"{{"version":1,"keys":[{{"key_id":1,"seed":"{seed}","created_at":0,"x":1}}]}}"#
        )));
        assert!(json(&format!(
            r#"{{"version":1,"keys":[{{"key_id":1,"seed":"{seed}"}}]}}"#
        )));
        assert!(
            json(r#"{"version":1,"version":1,"keys":[]}"#),
            "duplicate field"
        );
        assert!(json(&ring(&[(256, &seed, 0)])), "key id beyond u8");
        assert!(matches!(
            refused(r#"{"version":2,"keys":[]}"#),
            KeyringError::UnsupportedVersion(2)
        ));
        assert!(matches!(
            refused(r#"{"version":1,"keys":[]}"#),
            KeyringError::KeyCount(0)
        ));
        assert!(matches!(
            refused(&ring(&[(1, &seed, 0), (2, &seed, 0), (3, &seed, 0)])),
            KeyringError::KeyCount(3)
        ));
        assert!(matches!(
            refused(&ring(&[(1, &seed, 0), (1, &seed, 0)])),
            KeyringError::DuplicateKeyId(1)
        ));
        assert!(matches!(
            refused(&ring(&[(1, "zz", 0)])),
            KeyringError::SeedNotHex
        ));
        assert!(matches!(
            refused(&ring(&[(1, "00", 0)])),
            KeyringError::SeedLength
        ));
        assert!(matches!(
            refused(&ring(&[(1, &"00".repeat(33), 0)])),
            KeyringError::SeedLength
        ));
    }

    #[test]
    fn debug_shows_no_seed() {
        let seed = "ab".repeat(32);
        let ring = Keyring::parse(ring(&[(7, &seed, 0)]).as_bytes()).unwrap();
        let shown = format!("{ring:?}");
        assert_eq!(shown, "[7]");
        assert!(!shown.contains("abab"));
    }
}
