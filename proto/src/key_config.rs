//! OHTTP key configurations (RFC 9458 §3) and `application/ohttp-keys` lists, for the one HPKE
//! suite TokenGo speaks: DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-128-GCM.

use bytes::{Buf, BufMut};

// The suite's identifiers and sizes are HPKE's (RFC 9180 §7); a key configuration names them.
pub use crate::hpke::{AEAD_AES_128_GCM, KDF_HKDF_SHA256, KEM_X25519_HKDF_SHA256, PUBLIC_KEY_LEN};

/// Why a key configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyConfigError {
    /// The encoding ends early or a length field disagrees with the data.
    #[error("key configuration truncated or malformed")]
    Malformed,
    /// The KEM is not DHKEM(X25519, HKDF-SHA256).
    #[error("unsupported KEM 0x{0:04x}")]
    UnsupportedKem(u16),
    /// None of the listed symmetric suites is HKDF-SHA256 / AES-128-GCM.
    #[error("no supported symmetric suite (need HKDF-SHA256 / AES-128-GCM)")]
    NoSupportedSuite,
    /// A list decoded to no usable configuration.
    #[error("no usable key configuration in list")]
    Empty,
}

/// The public half of an OHTTP key: what a client needs to encapsulate to a gateway.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyConfig {
    /// Key identifier, chosen by the gateway; distinct for keys that overlap in time.
    pub key_id: u8,
    /// The X25519 public key (`pkR`).
    pub public_key: [u8; PUBLIC_KEY_LEN],
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyConfig")
            .field("key_id", &self.key_id)
            .field("public_key", &hex::encode(self.public_key))
            .finish()
    }
}

impl KeyConfig {
    /// Encodes as RFC 9458 §3.1 `Key Config`, listing our one symmetric suite.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + PUBLIC_KEY_LEN + 2 + 4);
        out.put_u8(self.key_id);
        out.put_u16(KEM_X25519_HKDF_SHA256);
        out.put_slice(&self.public_key);
        out.put_u16(4);
        out.put_u16(KDF_HKDF_SHA256);
        out.put_u16(AEAD_AES_128_GCM);
        out
    }

    /// Decodes one `Key Config` that must span all of `bytes`.
    pub fn decode(mut bytes: &[u8]) -> Result<Self, KeyConfigError> {
        let config = Self::read(&mut bytes)?;
        if bytes.has_remaining() {
            return Err(KeyConfigError::Malformed);
        }
        config
    }

    /// Reads one `Key Config` from the front of `buf`. The outer `Result` fails on framing
    /// (the rest of a list cannot be read), the inner one on an unsupported but well-framed
    /// configuration (a list reader may skip it).
    fn read(buf: &mut &[u8]) -> Result<Result<Self, KeyConfigError>, KeyConfigError> {
        if buf.remaining() < 3 {
            return Err(KeyConfigError::Malformed);
        }
        let key_id = buf.get_u8();
        let kem = buf.get_u16();
        if kem != KEM_X25519_HKDF_SHA256 {
            // Without knowing Npk for an unknown KEM the rest cannot be framed.
            return Err(KeyConfigError::UnsupportedKem(kem));
        }
        if buf.remaining() < PUBLIC_KEY_LEN + 2 {
            return Err(KeyConfigError::Malformed);
        }
        let mut public_key = [0u8; PUBLIC_KEY_LEN];
        buf.copy_to_slice(&mut public_key);
        let suites_len = usize::from(buf.get_u16());
        if suites_len == 0 || suites_len % 4 != 0 || buf.remaining() < suites_len {
            return Err(KeyConfigError::Malformed);
        }
        let (mut suites, rest) = buf.split_at(suites_len);
        *buf = rest;
        let mut supported = false;
        while suites.has_remaining() {
            let kdf = suites.get_u16();
            let aead = suites.get_u16();
            supported |= kdf == KDF_HKDF_SHA256 && aead == AEAD_AES_128_GCM;
        }
        Ok(if supported {
            Ok(Self { key_id, public_key })
        } else {
            Err(KeyConfigError::NoSupportedSuite)
        })
    }

    /// Encodes an `application/ohttp-keys` list (RFC 9458 §3.2): each config prefixed by
    /// its 2-byte length.
    #[must_use]
    pub fn encode_list(configs: &[KeyConfig]) -> Vec<u8> {
        let mut out = Vec::new();
        for config in configs {
            let encoded = config.encode();
            // A config is 41 bytes, far below u16::MAX.
            out.put_u16(encoded.len() as u16);
            out.put_slice(&encoded);
        }
        out
    }

    /// Decodes an `application/ohttp-keys` list, skipping well-framed configurations with
    /// unsupported algorithms (as RFC 9458 §3.2 asks). Fails when nothing usable remains.
    pub fn decode_list(mut bytes: &[u8]) -> Result<Vec<Self>, KeyConfigError> {
        let mut configs = Vec::new();
        while bytes.has_remaining() {
            if bytes.remaining() < 2 {
                return Err(KeyConfigError::Malformed);
            }
            let len = usize::from(bytes.get_u16());
            if bytes.remaining() < len {
                return Err(KeyConfigError::Malformed);
            }
            let (mut one, rest) = bytes.split_at(len);
            bytes = rest;
            match Self::read(&mut one) {
                Ok(Ok(config)) if !one.has_remaining() => configs.push(config),
                Ok(Ok(_)) => return Err(KeyConfigError::Malformed),
                Ok(Err(_)) | Err(KeyConfigError::UnsupportedKem(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if configs.is_empty() {
            return Err(KeyConfigError::Empty);
        }
        Ok(configs)
    }
}

/// An OHTTP key pair: what a gateway holds for one key id. The private key is zeroized on drop
/// and never printed.
pub struct KeyPair {
    key_id: u8,
    private_key: crate::hpke::PrivateKey,
}

impl KeyPair {
    /// Derives the key pair from a stored 32-byte seed with RFC 9180 `DeriveKeyPair`, the same
    /// derivation as the `ohttp` crate's `KeyConfig::derive`, so a seed names one key everywhere.
    #[must_use]
    pub fn from_seed(key_id: u8, seed: &[u8; 32]) -> Self {
        Self {
            key_id,
            private_key: crate::hpke::derive_key_pair(seed),
        }
    }

    /// Imports a raw X25519 private key (as in the RFC 9458 example). Prefer
    /// [`from_seed`](Self::from_seed) for stored keys.
    #[must_use]
    pub fn from_secret(key_id: u8, secret: [u8; 32]) -> Self {
        Self {
            key_id,
            private_key: crate::hpke::PrivateKey::from_bytes(secret),
        }
    }

    /// The key identifier clients put in front of their requests.
    #[must_use]
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// The public configuration to publish for this key.
    #[must_use]
    pub fn config(&self) -> KeyConfig {
        KeyConfig {
            key_id: self.key_id,
            public_key: *self.private_key.public_key(),
        }
    }

    pub(crate) fn private_key(&self) -> &crate::hpke::PrivateKey {
        &self.private_key
    }
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("key_id", &self.key_id)
            .field("public_key", &hex::encode(self.private_key.public_key()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9458 Appendix A key configuration (it lists AES-128-GCM and ChaCha20Poly1305).
    const RFC9458_KEY_CONFIG: &str = "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003";

    #[test]
    fn decodes_rfc9458_appendix_a_config() {
        let bytes = hex::decode(RFC9458_KEY_CONFIG).unwrap();
        let config = KeyConfig::decode(&bytes).unwrap();
        assert_eq!(config.key_id, 1);
        assert_eq!(
            hex::encode(config.public_key),
            "31e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e798155"
        );
        // We re-encode with only the suite we speak.
        assert_eq!(
            hex::encode(config.encode()),
            "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500040001 0001"
                .replace(' ', "")
        );
    }

    #[test]
    fn list_round_trip_and_skips_unsupported() {
        let a = KeyConfig {
            key_id: 7,
            public_key: [1; 32],
        };
        let b = KeyConfig {
            key_id: 8,
            public_key: [2; 32],
        };
        let list = KeyConfig::encode_list(&[a, b]);
        assert_eq!(KeyConfig::decode_list(&list).unwrap(), vec![a, b]);

        // A config whose only suite is ChaCha20Poly1305 is skipped, not fatal.
        let mut chacha = a.encode();
        let n = chacha.len();
        chacha[n - 2..].copy_from_slice(&3u16.to_be_bytes());
        let mut mixed = Vec::new();
        mixed.put_u16(chacha.len() as u16);
        mixed.put_slice(&chacha);
        mixed.extend_from_slice(&KeyConfig::encode_list(&[b]));
        assert_eq!(KeyConfig::decode_list(&mixed).unwrap(), vec![b]);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(KeyConfig::decode(&[]), Err(KeyConfigError::Malformed));
        let good = KeyConfig {
            key_id: 1,
            public_key: [9; 32],
        }
        .encode();
        assert_eq!(
            KeyConfig::decode(&good[..good.len() - 1]),
            Err(KeyConfigError::Malformed)
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(KeyConfig::decode(&trailing), Err(KeyConfigError::Malformed));
        let mut other_kem = good;
        other_kem[2] = 0x21;
        assert_eq!(
            KeyConfig::decode(&other_kem),
            Err(KeyConfigError::UnsupportedKem(0x21))
        );
        assert_eq!(KeyConfig::decode_list(&[]), Err(KeyConfigError::Empty));
        assert_eq!(
            KeyConfig::decode_list(&[0, 5, 1]),
            Err(KeyConfigError::Malformed)
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = KeyConfig::decode(&bytes);
            let _ = KeyConfig::decode_list(&bytes);
        }
    }

    #[test]
    fn key_pair_from_seed_is_rfc9180_derive_key_pair() {
        // RFC 9180 A.1.1: DeriveKeyPair(ikmR) gives pkRm.
        let ikm_r: [u8; 32] =
            hex::decode("6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037")
                .unwrap()
                .try_into()
                .unwrap();
        let pair = KeyPair::from_seed(3, &ikm_r);
        assert_eq!(pair.key_id(), 3);
        assert_eq!(
            hex::encode(pair.config().public_key),
            "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d"
        );
    }

    #[test]
    fn key_pair_from_secret_matches_rfc9458_config() {
        let secret: [u8; 32] =
            hex::decode("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
                .unwrap()
                .try_into()
                .unwrap();
        let pair = KeyPair::from_secret(1, secret);
        let rfc = KeyConfig::decode(&hex::decode(RFC9458_KEY_CONFIG).unwrap()).unwrap();
        assert_eq!(pair.config(), rfc);
        let debug = format!("{pair:?}");
        assert!(debug.contains("31e1f05a"));
        assert!(
            !debug.contains("3c168975"),
            "Debug must not print the private key: {debug}"
        );
    }
}
