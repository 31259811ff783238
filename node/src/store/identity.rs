//! Node identities: Ed25519 keys in libp2p's protobuf encoding. The PeerId derived from the key
//! names a relay or exit, and the QUIC certificate proves it.

use std::path::Path;

use libp2p_identity::{Keypair, PeerId};

use crate::store::data_dir::{self, DataDirError};

/// Why an identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file failed.
    #[error(transparent)]
    Io(#[from] DataDirError),
    /// The file is not there, and may not be created (a read-only key directory).
    #[error(
        "{path} does not exist: the key directory (--keys-dir) is read-only and nothing is created there; put the identity key there (`tokengo keygen --type identity --output {path}`, or the operator's Secret) or leave out --keys-dir to create it in the data directory"
    )]
    Missing {
        /// The file.
        path: String,
    },
    /// The file does not hold a libp2p-encoded Ed25519 key.
    #[error(
        "{path} is not a TokenGo identity key (libp2p protobuf Ed25519); create one with `tokengo keygen --type identity`"
    )]
    Invalid {
        /// The file.
        path: String,
    },
}

/// Loads the identity at `path`, creating and saving a new one on first start.
/// Returns the key and whether it was newly created.
pub fn load_or_create(path: &Path) -> Result<(Keypair, bool), IdentityError> {
    if let Some(bytes) = data_dir::read_if_exists(path)? {
        return decode(path, &bytes).map(|key| (key, false));
    }
    let key = Keypair::generate_ed25519();
    write_new(path, &key)?;
    Ok((key, true))
}

/// Loads the identity at `path`, which must exist: for a read-only key directory, where
/// nothing is ever created (`--keys-dir`).
pub fn load_existing(path: &Path) -> Result<Keypair, IdentityError> {
    match data_dir::read_if_exists(path)? {
        Some(bytes) => decode(path, &bytes),
        None => Err(IdentityError::Missing {
            path: path.display().to_string(),
        }),
    }
}

/// Writes a new identity file (mode 0600); never overwrites.
pub fn write_new(path: &Path, key: &Keypair) -> Result<(), IdentityError> {
    let encoded = key
        .to_protobuf_encoding()
        .map_err(|_| IdentityError::Invalid {
            path: path.display().to_string(),
        })?;
    data_dir::write_secret_new(path, &encoded)?;
    Ok(())
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, IdentityError> {
    let invalid = || IdentityError::Invalid {
        path: path.display().to_string(),
    };
    let key = Keypair::from_protobuf_encoding(bytes).map_err(|_| invalid())?;
    // Only Ed25519: it is what the descriptors and certificates are specified with.
    key.clone().try_into_ed25519().map_err(|_| invalid())?;
    Ok(key)
}

/// The PeerId of a key.
#[must_use]
pub fn peer_id(key: &Keypair) -> PeerId {
    key.public().to_peer_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let (first, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (second, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(peer_id(&first), peer_id(&second));
    }

    #[test]
    fn an_existing_identity_is_read_and_a_missing_one_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let error = load_existing(&path).unwrap_err().to_string();
        assert!(error.contains("id.key does not exist"), "{error}");
        assert!(error.contains("--keys-dir"), "{error}");
        assert!(!path.exists(), "nothing was created");
        let (created, _) = load_or_create(&path).unwrap();
        assert_eq!(peer_id(&load_existing(&path).unwrap()), peer_id(&created));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        std::fs::write(&path, b"not a key").unwrap();
        let error = load_or_create(&path).unwrap_err().to_string();
        assert!(error.contains("keygen --type identity"), "{error}");
    }
}
