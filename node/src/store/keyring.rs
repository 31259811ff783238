//! The exit's OHTTP keyring file (`ohttp_keys.json`, mode 0600): loading, creating and saving
//! it, and the exit's rotation schedule (pure: when the next rotation or retirement is due).
//! The format and the rotation rule are `tokengo_proto::keyring`'s, shared with the
//! operator, which writes the same bytes into a Secret.

use std::{path::Path, time::Duration};

pub use tokengo_proto::keyring::Keyring;
use tokengo_proto::keyring::KeyringError as FormatError;
use zeroize::Zeroizing;

/// Longest time the previous key is still accepted after a rotation.
pub use crate::config::defaults::MAX_KEY_OVERLAP as MAX_OVERLAP;
use crate::store::data_dir::{self, DataDirError};

/// Why a keyring could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    Io(#[from] DataDirError),
    /// The file is not there, and may not be created (a read-only key directory).
    #[error(
        "{path} does not exist: the key directory (--keys-dir) is read-only and nothing is created there; put the OHTTP keyring there (`tokengo keygen --type ohttp --output {path}`, or the operator's Secret) or leave out --keys-dir to create it in the data directory"
    )]
    Missing {
        /// The file.
        path: String,
    },
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

/// Loads the ring at `path`, which must exist: for a read-only key directory, where nothing
/// is ever created (`--keys-dir`).
pub fn load_existing(path: &Path) -> Result<Keyring, KeyringError> {
    let Some(bytes) = data_dir::read_if_exists(path)? else {
        return Err(KeyringError::Missing {
            path: path.display().to_string(),
        });
    };
    let bytes = Zeroizing::new(bytes);
    Keyring::parse(&bytes).map_err(|e| KeyringError::of(path, e))
}

/// Saves `ring` to a new file; fails if one exists (never destroys a key).
pub fn save_new(ring: &Keyring, path: &Path) -> Result<(), KeyringError> {
    Ok(data_dir::write_secret_new(path, &ring.encode())?)
}

/// Saves `ring`, replacing the file atomically.
pub fn save(ring: &Keyring, path: &Path) -> Result<(), KeyringError> {
    Ok(data_dir::replace_secret(path, &ring.encode())?)
}

/// How long the previous key stays accepted after a rotation every `period`: the smaller of
/// the period and [`MAX_OVERLAP`] (a ring holds two keys, so a rotation drops the oldest).
#[must_use]
pub fn overlap(period: Duration) -> Duration {
    period.min(MAX_OVERLAP)
}

/// A change the rotation schedule makes to the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEvent {
    /// A fresh key becomes current; the current one becomes the previous one.
    Rotate,
    /// The previous key's overlap ended: it is dropped.
    RetirePrevious,
}

/// The next change to `ring` under a rotation every `period`, and when it is due (as time
/// since the Unix epoch; at or before now means at once).
#[must_use]
pub fn next_event(ring: &Keyring, period: Duration) -> (Duration, KeyEvent) {
    let created = Duration::from_secs(ring.current_created_at());
    let rotate_at = created.saturating_add(period);
    let retire_at = created.saturating_add(overlap(period));
    if ring.has_previous() && retire_at < rotate_at {
        (retire_at, KeyEvent::RetirePrevious)
    } else {
        (rotate_at, KeyEvent::Rotate)
    }
}

/// A copy of `ring` (the ring holds secrets and is not `Clone`: the copy goes through its
/// encoding, which the caller then zeroizes with the copy).
pub fn duplicate(ring: &Keyring) -> Result<Keyring, KeyringError> {
    Keyring::parse(&ring.encode()).map_err(|e| KeyringError::of(Path::new("(memory)"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_rotates_each_period_and_retires_the_previous_key_after_the_overlap() {
        let hour = Duration::from_secs(3600);
        let week = hour * 168;
        assert_eq!(overlap(week), MAX_OVERLAP);
        assert_eq!(overlap(Duration::from_secs(4)), Duration::from_secs(4));
        let mut ring = Keyring::generate(1, 1_000).unwrap();
        assert_eq!(
            next_event(&ring, week),
            (Duration::from_secs(1_000) + week, KeyEvent::Rotate)
        );
        ring.rotate(2_000).unwrap();
        assert_eq!(
            next_event(&ring, week),
            (
                Duration::from_secs(2_000) + MAX_OVERLAP,
                KeyEvent::RetirePrevious
            )
        );
        let copy = duplicate(&ring).unwrap();
        assert_eq!(copy.public_keys(), ring.public_keys());
        ring.retire_previous();
        assert_eq!(
            next_event(&ring, week),
            (Duration::from_secs(2_000) + week, KeyEvent::Rotate)
        );
        // A period shorter than the longest overlap: the rotation itself drops the oldest key.
        let fast = Duration::from_secs(4);
        let mut ring = Keyring::generate(1, 10).unwrap();
        ring.rotate(14).unwrap();
        assert_eq!(
            next_event(&ring, fast),
            (Duration::from_secs(18), KeyEvent::Rotate)
        );
    }

    #[test]
    fn persists_and_rotates_with_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(tokengo_proto::data_dir::EXIT_KEYRING_FILE);
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
    fn an_existing_ring_is_read_and_a_missing_one_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(tokengo_proto::data_dir::EXIT_KEYRING_FILE);
        let error = load_existing(&path).unwrap_err().to_string();
        assert!(error.contains("does not exist"), "{error}");
        assert!(error.contains("keygen --type ohttp"), "{error}");
        assert!(!path.exists(), "nothing was created");
        let (ring, _) = load_or_create(&path, 100).unwrap();
        assert_eq!(load_existing(&path).unwrap().configs(), ring.configs());
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
