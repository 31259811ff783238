//! Follows an OHTTP keyring that something else rotates (`--keys-dir`; in Kubernetes the
//! operator rotates it in a Secret that the kubelet swaps in place): the file is read again
//! every few seconds and a changed ring is served at once, so a rotation needs no restart and
//! the exit's tunnels, identity and replay window all stay.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::Gateway;
use crate::store::{data_dir, keyring::Keyring};

/// What a keyring read again changes for the exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyChange {
    /// The same keys: nothing to do.
    Unchanged,
    /// A new current key: served at once, and every relay gets a descriptor listing it.
    Rotated,
    /// The same current key, other previous keys (the previous one retired): served at once;
    /// the descriptor lists only the current key, so it stays.
    PreviousChanged,
}

/// How `next` differs from `serving`, judged by the public keys (id, configuration and
/// creation time), current first.
pub(super) fn change(serving: &Keyring, next: &Keyring) -> KeyChange {
    let (serving, next) = (serving.public_keys(), next.public_keys());
    if serving == next {
        KeyChange::Unchanged
    } else if serving.first() == next.first() {
        KeyChange::PreviousChanged
    } else {
        KeyChange::Rotated
    }
}

/// The follower: what it reads and what it changes.
pub(super) struct KeyFollow {
    /// The keyring file in the read-only key directory.
    pub(super) path: PathBuf,
    /// How often the file is read again.
    pub(super) every: Duration,
    /// The ring the exit's descriptor is made from.
    pub(super) ring: Arc<Mutex<Keyring>>,
    /// The gateway that opens requests.
    pub(super) gateway: Arc<Gateway>,
    /// Bumped when the current key changes: each tunnel registers the new descriptor.
    pub(super) changes: watch::Sender<u64>,
}

impl KeyFollow {
    /// Reads the file every `every` until shutdown. A file that is missing or not a keyring
    /// is reported once per content and changes nothing: the exit keeps serving the keys it
    /// has (the previous key is still in any ring the operator writes next).
    pub(super) async fn run(self, shutdown: CancellationToken) {
        tracing::info!(
            path = %self.path.display(),
            every = ?self.every,
            "following the OHTTP keyring in the key directory (a rotation there is served without a restart)"
        );
        let mut seen: Option<Zeroizing<Vec<u8>>> = None;
        let mut ticks = tokio::time::interval(self.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Some(next) = read_changed(&self.path, &mut seen) {
                self.apply(next);
            }
        }
    }

    fn apply(&self, next: Keyring) {
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let change = change(&ring, &next);
        if change != KeyChange::Unchanged {
            let rotated = change == KeyChange::Rotated;
            super::rotation::serve(ring, next, rotated, &self.gateway, &self.changes);
        }
    }
}

/// One look at the keyring file: the ring it holds when its bytes differ from those `seen`
/// last time and parse, else `None`. A missing or invalid file is reported (once per content)
/// and yields `None`, so the exit keeps the keys it serves.
fn read_changed(path: &Path, seen: &mut Option<Zeroizing<Vec<u8>>>) -> Option<Keyring> {
    let bytes = match data_dir::read_if_exists(path) {
        Ok(Some(bytes)) => Zeroizing::new(bytes),
        Ok(None) => {
            if seen.take().is_some() {
                tracing::warn!(path = %path.display(), "the OHTTP keyring left the key directory; the current keys stay in use");
            }
            return None;
        }
        Err(error) => {
            tracing::warn!(%error, "reading the OHTTP keyring failed; the current keys stay in use");
            return None;
        }
    };
    if seen.as_ref().is_some_and(|s| **s == *bytes) {
        return None;
    }
    let next = Keyring::parse(&bytes);
    if let Err(error) = &next {
        tracing::warn!(
            path = %path.display(),
            %error,
            "the OHTTP keyring in the key directory is not valid; the current keys stay in use"
        );
    }
    *seen = Some(bytes);
    next.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(now: u64) -> Keyring {
        Keyring::generate(1, now).unwrap()
    }

    #[test]
    fn a_new_current_key_is_a_rotation_and_a_dropped_previous_key_is_not() {
        let first = ring(100);
        assert_eq!(change(&first, &first), KeyChange::Unchanged);
        let same_bytes = Keyring::parse(&first.encode()).unwrap();
        assert_eq!(change(&first, &same_bytes), KeyChange::Unchanged);

        let mut rotated = Keyring::parse(&first.encode()).unwrap();
        rotated.rotate(200).unwrap();
        assert_eq!(change(&first, &rotated), KeyChange::Rotated);

        let mut retired = Keyring::parse(&rotated.encode()).unwrap();
        retired.retire_previous();
        assert_eq!(change(&rotated, &retired), KeyChange::PreviousChanged);

        // Another ring with the same key id and time (a re-created Secret) is other keys.
        assert_eq!(change(&first, &ring(100)), KeyChange::Rotated);
    }

    #[test]
    fn the_file_is_taken_when_it_changes_and_only_when_it_is_a_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ohttp_keys.json");
        let mut seen = None;
        assert!(read_changed(&path, &mut seen).is_none(), "no file yet");

        let first = ring(100);
        std::fs::write(&path, &*first.encode()).unwrap();
        let read = read_changed(&path, &mut seen).expect("a new file is read");
        assert_eq!(change(&first, &read), KeyChange::Unchanged);
        assert!(
            read_changed(&path, &mut seen).is_none(),
            "the same bytes again"
        );

        std::fs::write(&path, b"{ not a keyring").unwrap();
        assert!(
            read_changed(&path, &mut seen).is_none(),
            "garbage is refused"
        );
        assert!(
            read_changed(&path, &mut seen).is_none(),
            "and reported once"
        );

        let mut rotated = Keyring::parse(&first.encode()).unwrap();
        rotated.rotate(200).unwrap();
        std::fs::write(&path, &*rotated.encode()).unwrap();
        let read = read_changed(&path, &mut seen).expect("the rotated ring is read");
        assert_eq!(change(&first, &read), KeyChange::Rotated);

        std::fs::remove_file(&path).unwrap();
        assert!(
            read_changed(&path, &mut seen).is_none(),
            "a missing file changes nothing"
        );
        std::fs::write(&path, &*rotated.encode()).unwrap();
        assert!(
            read_changed(&path, &mut seen).is_some(),
            "the file back is read again (it may hold other keys by then)"
        );
    }
}
