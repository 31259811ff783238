//! The exit's key rotation schedule as a task: rotates the OHTTP key every period, retires the
//! previous key when its overlap ends, saves the ring before using it, and tells the tunnels to
//! register the new descriptor with every relay.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Gateway;
use crate::{
    clock::unix_now,
    store::keyring::{self, KeyEvent, Keyring, KeyringError},
};

/// Longest wait before a failed rotation (the key file could not be written) is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// What the schedule changes.
pub(super) struct Rotation {
    /// Time between rotations.
    pub(super) period: Duration,
    /// The keyring file (written before a new ring is used).
    pub(super) path: PathBuf,
    /// The ring the exit's descriptor is made from.
    pub(super) ring: Arc<Mutex<Keyring>>,
    /// The gateway that opens requests.
    pub(super) gateway: Arc<Gateway>,
    /// Bumped at every rotation: each tunnel registers the new descriptor.
    pub(super) changes: watch::Sender<u64>,
}

impl Rotation {
    /// Runs the schedule until shutdown. A key overdue at start (the exit was down at its
    /// time) is rotated at once.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        tracing::info!(
            period = ?self.period,
            overlap = ?keyring::overlap(self.period),
            "OHTTP key rotation scheduled"
        );
        loop {
            let (at, event) = keyring::next_event(&self.lock(), self.period);
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(at.saturating_sub(now)) => {}
            }
            if let Err(error) = self.apply(event) {
                let retry = self.period.min(RETRY_AFTER);
                tracing::warn!(
                    %error,
                    ?retry,
                    "OHTTP key rotation failed; the current keys stay in use. Make the data directory writable, or turn rotation off with --key-rotation-hours 0"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                }
            }
        }
    }

    /// Applies `event` to a copy of the ring, saves it, then makes it the exit's: a restart
    /// never returns to a key the exit already replaced, and a failed save changes nothing.
    fn apply(&self, event: KeyEvent) -> Result<(), KeyringError> {
        let ring = self.lock();
        let mut next = keyring::duplicate(&ring)?;
        match event {
            KeyEvent::Rotate => next.rotate(unix_now()).map_err(|_| KeyringError::Random)?,
            KeyEvent::RetirePrevious => next.retire_previous(),
        }
        keyring::save(&next, &self.path)?;
        serve(
            ring,
            next,
            event == KeyEvent::Rotate,
            &self.gateway,
            &self.changes,
        );
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keyring> {
        // A replaced ring is a single assignment: a poisoned lock still holds a whole ring.
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Makes `next` the ring in use (`ring`, held locked so no other change comes between): the
/// gateway opens requests with its keys and, when its current key is new (`rotated`), every
/// tunnel registers the descriptor that lists it. Shared by the exit's own schedule and the
/// follower of a key directory ([`super::key_follow`]).
pub(super) fn serve(
    mut ring: std::sync::MutexGuard<'_, Keyring>,
    next: Keyring,
    rotated: bool,
    gateway: &Gateway,
    changes: &watch::Sender<u64>,
) {
    if rotated {
        gateway.set_keys(&next);
    } else {
        gateway.retire_keys(&next);
    }
    *ring = next;
    drop(ring);
    if rotated {
        changes.send_modify(|generation| *generation += 1);
    }
}
