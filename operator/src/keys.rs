//! Key material the operator creates for nodes, in exactly the formats the node reads from its
//! keys directory (`--keys-dir`; file names in `tokengo_proto::data_dir`): `*_identity.key` (libp2p
//! protobuf-encoded Ed25519) and `ohttp_keys.json` (the exit's keyring of 32-byte HPKE seeds,
//! current first, previous second during the overlap).
//! Pure: generation takes randomness from the OS, everything else is a function of bytes. The
//! keyring format and its rotation rule are `tokengo_proto::keyring`'s, shared with the node.

use libp2p_identity::{Keypair, PeerId};
use tokengo_proto::keyring::KeyringError;
pub use tokengo_proto::keyring::{Keyring, PublicKey};
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
    InvalidKeyring(KeyringError),
}

impl From<KeyringError> for KeyError {
    fn from(error: KeyringError) -> Self {
        match error {
            KeyringError::Random => Self::Random,
            invalid => Self::InvalidKeyring(invalid),
        }
    }
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

#[cfg(test)]
mod tests {
    use tokengo_proto::{
        data_dir::{EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE},
        key_config::KeyConfig,
    };

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

    /// The node itself loads what the operator writes: same key configurations.
    #[test]
    fn the_node_reads_the_operators_keyring() {
        let mut ring = Keyring::generate(1, 10).unwrap();
        ring.rotate(20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EXIT_KEYRING_FILE);
        std::fs::write(&path, ring.encode()).unwrap();
        let (loaded, created) = tokengo::keyring::load_or_create(&path, 30).unwrap();
        assert!(!created);
        let ours: Vec<KeyConfig> = ring.public_keys().into_iter().map(|k| k.config).collect();
        assert_eq!(loaded.configs(), ours);

        let identity = new_identity().unwrap();
        let id_path = dir.path().join(EXIT_IDENTITY_FILE);
        std::fs::write(&id_path, &*identity).unwrap();
        let (node_key, created) = tokengo::identity::load_or_create(&id_path).unwrap();
        assert!(!created);
        assert_eq!(
            tokengo::identity::peer_id(&node_key),
            peer_id(&identity).unwrap()
        );
    }
}
