//! The exit's OHTTP keyring file (`ohttp_keys.json`, mode 0600): loading, creating and saving
//! it. The format and the rotation rule are `tokengo_proto::keyring`'s, shared with the
//! operator, which writes the same bytes into a Secret.

use std::path::Path;

pub use tokengo_proto::keyring::Keyring;
use tokengo_proto::keyring::KeyringError as FormatError;
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
        reason: FormatError,
    },
    /// The system random number generator failed.
    #[error("system random number generator unavailable")]
    Random,
}

impl KeyringError {
    fn of(path: &Path, error: FormatError) -> Self {
        match error {
            FormatError::Random => Self::Random,
            reason => Self::Invalid {
                path: path.display().to_string(),
                reason,
            },
        }
    }
}

/// Loads the ring at `path`, or creates (key id 1, created at `now`) and saves a new one.
/// Returns whether it was created.
pub fn load_or_create(path: &Path, now: u64) -> Result<(Keyring, bool), KeyringError> {
    if let Some(bytes) = data_dir::read_if_exists(path)? {
        let bytes = Zeroizing::new(bytes);
        return Keyring::parse(&bytes)
            .map(|ring| (ring, false))
            .map_err(|e| KeyringError::of(path, e));
    }
    let ring = Keyring::generate(1, now).map_err(|e| KeyringError::of(path, e))?;
    save_new(&ring, path)?;
    Ok((ring, true))
}

/// Saves `ring` to a new file; fails if one exists (never destroys a key).
pub fn save_new(ring: &Keyring, path: &Path) -> Result<(), KeyringError> {
    Ok(data_dir::write_secret_new(path, &ring.encode())?)
}

/// Saves `ring`, replacing the file atomically.
pub fn save(ring: &Keyring, path: &Path) -> Result<(), KeyringError> {
    Ok(data_dir::replace_secret(path, &ring.encode())?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_rotates_with_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ohttp_keys.json");
        let (mut ring, created) = load_or_create(&path, 100).unwrap();
        assert!(created);
        let first = ring.configs();
        assert_eq!(first[0].key_id, 1);
        let (again, created) = load_or_create(&path, 200).unwrap();
        assert!(!created);
        assert_eq!(again.configs(), first);
        assert!(save_new(&ring, &path).is_err(), "never overwrites a key");

        ring.rotate(300).unwrap();
        ring.rotate(400).unwrap();
        let twice = ring.configs();
        save(&ring, &path).unwrap();
        let (reloaded, _) = load_or_create(&path, 500).unwrap();
        assert_eq!(reloaded.configs(), twice);
        assert_eq!(reloaded.current_created_at(), 400);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn rejects_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        for text in [
            "nope",
            r#"{"version":2,"keys":[]}"#,
            r#"{"version":1,"keys":[{"key_id":1,"seed":"00","created_at":0}]}"#,
        ] {
            std::fs::write(&path, text).unwrap();
            let error = load_or_create(&path, 0).unwrap_err().to_string();
            assert!(
                error.contains("k.json is not a TokenGo OHTTP keyring"),
                "{error}"
            );
            assert!(error.contains("keygen --type ohttp"), "{error}");
        }
    }
}
