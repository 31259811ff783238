//! Where a relay or an exit reads its keys from: the data directory (created on first start,
//! the exit's keyring rewritten at each rotation), or a read-only key directory
//! (`--keys-dir`, in Kubernetes a mounted Secret) in which nothing is ever created or
//! written. Writable state (the relay cache) stays in the data directory either way.

use std::path::{Path, PathBuf};

use libp2p_identity::Keypair;

use crate::store::{
    data_dir::DataDir,
    identity::{self, IdentityError},
    keyring::{self, Keyring, KeyringError},
};

/// Where a node's keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The data directory: a key missing there is created (mode 0600), and the exit's
    /// keyring is replaced at each rotation.
    DataDir(DataDir),
    /// A read-only directory: every key must be there; nothing is created or written.
    ReadOnly(PathBuf),
}

impl KeySource {
    /// The keys of a node given `keys_dir` (read-only) or else its data directory.
    #[must_use]
    pub fn of(data_dir: &DataDir, keys_dir: Option<&Path>) -> Self {
        match keys_dir {
            Some(dir) => Self::ReadOnly(dir.to_path_buf()),
            None => Self::DataDir(data_dir.clone()),
        }
    }

    /// Whether keys may be created and rewritten here (a rotating exit needs that).
    #[must_use]
    pub fn writable(&self) -> bool {
        matches!(self, Self::DataDir(_))
    }

    /// Path of the key file `name`.
    #[must_use]
    pub fn file(&self, name: &str) -> PathBuf {
        match self {
            Self::DataDir(dir) => dir.file(name),
            Self::ReadOnly(dir) => dir.join(name),
        }
    }

    /// The identity in file `name`, and whether it was created now (never in a read-only
    /// directory, where a missing file is an error naming it).
    pub fn identity(&self, name: &str) -> Result<(Keypair, bool), IdentityError> {
        let path = self.file(name);
        match self {
            Self::DataDir(dir) => {
                dir.ensure()?;
                identity::load_or_create(&path)
            }
            Self::ReadOnly(_) => identity::load_existing(&path).map(|key| (key, false)),
        }
    }

    /// The exit's OHTTP keyring, and whether it was created now (`now`: its creation time);
    /// never created in a read-only directory.
    pub fn keyring(&self, now: u64) -> Result<(Keyring, bool), KeyringError> {
        let path = self.file(tokengo_proto::data_dir::EXIT_KEYRING_FILE);
        match self {
            Self::DataDir(dir) => {
                dir.ensure()?;
                keyring::load_or_create(&path, now)
            }
            Self::ReadOnly(_) => keyring::load_existing(&path).map(|ring| (ring, false)),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokengo_proto::data_dir::{EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE};

    use super::*;

    #[test]
    fn a_read_only_directory_is_read_and_never_written() {
        let data = tempfile::tempdir().unwrap();
        let data_dir = DataDir::resolve(Some(data.path().join("data"))).unwrap();
        let writable = KeySource::of(&data_dir, None);
        assert!(writable.writable());
        let (identity, created) = writable.identity(EXIT_IDENTITY_FILE).unwrap();
        assert!(created);
        let (ring, created) = writable.keyring(100).unwrap();
        assert!(created);

        // The same keys, read from where a Secret would be mounted.
        let keys = tempfile::tempdir().unwrap();
        let read_only = KeySource::of(&data_dir, Some(keys.path()));
        assert!(!read_only.writable());
        let missing = read_only.identity(EXIT_IDENTITY_FILE).unwrap_err();
        assert!(
            matches!(missing, IdentityError::Missing { .. }),
            "{missing}"
        );
        assert!(read_only.keyring(100).is_err());
        assert_eq!(
            std::fs::read_dir(keys.path()).unwrap().count(),
            0,
            "nothing created in the key directory"
        );
        for name in [EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE] {
            std::fs::copy(writable.file(name), keys.path().join(name)).unwrap();
        }
        let (again, created) = read_only.identity(EXIT_IDENTITY_FILE).unwrap();
        assert!(!created);
        assert_eq!(identity::peer_id(&again), identity::peer_id(&identity));
        let (ring_again, created) = read_only.keyring(200).unwrap();
        assert!(!created);
        assert_eq!(ring_again.configs(), ring.configs());
    }
}
