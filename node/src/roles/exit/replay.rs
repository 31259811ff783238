//! Replay protection for encapsulated requests. OHTTP has none (RFC 9458 §6.5): a relay, or
//! anyone who recorded a request, could send it again and make the backend run it twice.
//!
//! Two checks together close it, across restarts and floods:
//! - every request carries a `Date` inside its encryption; the exit accepts it only within a
//!   skew window around its own clock, and never when dated before the exit started (so a
//!   restart, which forgets what was seen, cannot let an old request back in);
//! - within that window every request's HPKE encapsulated key (`enc`, fresh per request) is
//!   remembered until its date leaves the window. When the memory bound is reached the exit
//!   refuses new requests (fails closed) rather than forget one early.
//!
//! A key is remembered as a 64-bit fingerprint under a per-process random SipHash key (about
//! 40 bytes an entry instead of about 100): two different requests share a fingerprint with a
//! probability of about n / 2^64 for n remembered (below 10^-12 at the default bound), and
//! nobody can aim at a collision without the process's key. A collision refuses an honest
//! request as a replay; it can never admit a replay.
//!
//! Pure logic: times are passed in, so tests move the clock.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashSet},
    hash::{BuildHasher as _, RandomState},
    sync::Mutex,
};

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum ReplayError {
    /// No `Date` field, or one that is not an HTTP date.
    #[error("the request carries no valid Date; update the client")]
    NoDate,
    /// Dated before this exit started: it may have been seen by the exit before a restart.
    #[error("the request is dated before the exit started; retry")]
    BeforeStart,
    /// Dated too long ago.
    #[error(
        "the request's Date is {0} s behind the exit's clock (at most {1} s accepted); if this machine's clock is wrong, correct it (NTP)"
    )]
    TooOld(u64, u64),
    /// Dated in the future.
    #[error(
        "the request's Date is {0} s ahead of the exit's clock (at most {1} s accepted); if this machine's clock is wrong, correct it (NTP)"
    )]
    InFuture(u64, u64),
    /// This `enc` was seen within the window.
    #[error("the request was already received")]
    Replayed,
    /// The window holds as many keys as it may.
    #[error("replay memory full")]
    Full,
}

/// The seen-key memory and the date window.
#[derive(Debug)]
pub(super) struct ReplayWindow {
    /// Largest accepted distance between a request's date and the exit's clock, seconds.
    skew: u64,
    /// Most keys remembered at once.
    capacity: usize,
    /// Requests dated before this (Unix seconds) are refused.
    not_before: u64,
    /// Keys the fingerprints (random per process).
    fingerprints: RandomState,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// Fingerprints of the remembered keys.
    keys: HashSet<u64>,
    /// (when the key may be forgotten, its fingerprint), earliest first.
    expiry: BinaryHeap<Reverse<(u64, u64)>>,
}

impl ReplayWindow {
    /// A window for an exit started at `started` (Unix seconds): requests dated in that
    /// second or before are refused, since the previous run may have seen them.
    #[must_use]
    pub(super) fn new(skew: u64, capacity: usize, started: u64) -> Self {
        Self {
            skew,
            capacity: capacity.max(1),
            not_before: started.saturating_add(1),
            fingerprints: RandomState::new(),
            seen: Mutex::default(),
        }
    }

    fn fingerprint(&self, enc: &[u8; 32]) -> u64 {
        self.fingerprints.hash_one(enc)
    }

    /// The first second (Unix) whose requests are accepted.
    #[must_use]
    pub(super) fn not_before(&self) -> u64 {
        self.not_before
    }

    /// Whether `enc` is remembered now: such a request is a replay and can be refused before
    /// the HPKE work of decapsulating it. Only [`admit`](Self::admit), after a successful
    /// decapsulation, ever remembers a key, so nobody can make a fresh request look seen.
    /// A key past its time is refused by its date anyway, so forgetting it lazily is fine.
    pub(super) fn seen(&self, enc: &[u8; 32]) -> bool {
        let key = self.fingerprint(enc);
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys
            .contains(&key)
    }

    /// Checks a decapsulated request dated `date` (Unix seconds) against the exit's clock
    /// `now`, and remembers its `enc` if it is admitted.
    pub(super) fn admit(&self, enc: &[u8], date: Option<u64>, now: u64) -> Result<(), ReplayError> {
        let date = date.ok_or(ReplayError::NoDate)?;
        let key = self.fingerprint(&<[u8; 32]>::try_from(enc).map_err(|_| ReplayError::NoDate)?);
        if date < self.not_before {
            return Err(ReplayError::BeforeStart);
        }
        if now > date.saturating_add(self.skew) {
            return Err(ReplayError::TooOld(now - date, self.skew));
        }
        if date > now.saturating_add(self.skew) {
            return Err(ReplayError::InFuture(date - now, self.skew));
        }
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A key is kept while its date is inside the window: once `now` passes date + skew the
        // date check refuses the request on its own.
        while let Some(Reverse((expires, old))) = seen.expiry.peek().copied() {
            if expires >= now {
                break;
            }
            seen.expiry.pop();
            seen.keys.remove(&old);
        }
        if seen.keys.contains(&key) {
            return Err(ReplayError::Replayed);
        }
        if seen.keys.len() >= self.capacity {
            return Err(ReplayError::Full);
        }
        seen.keys.insert(key);
        seen.expiry
            .push(Reverse((date.saturating_add(self.skew), key)));
        Ok(())
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: u64 = 1_700_000_000;

    #[test]
    fn refuses_repeats_while_the_date_is_in_the_window() {
        let window = ReplayWindow::new(60, 10, START);
        let t = START + 10;
        assert_eq!(window.admit(&[1; 32], Some(t), t), Ok(()));
        assert_eq!(window.admit(&[2; 32], Some(t), t), Ok(()));
        assert_eq!(
            window.admit(&[1; 32], Some(t), t + 30),
            Err(ReplayError::Replayed)
        );
        // At the edge of the window the key is still remembered.
        assert_eq!(
            window.admit(&[1; 32], Some(t), t + 60),
            Err(ReplayError::Replayed)
        );
        // After it, the date alone refuses the request (11 minutes later, say).
        assert_eq!(
            window.admit(&[1; 32], Some(t), t + 660),
            Err(ReplayError::TooOld(660, 60))
        );
        assert_eq!(window.admit(&[0; 31], Some(t), t), Err(ReplayError::NoDate));
        assert_eq!(window.admit(&[3; 32], None, t), Err(ReplayError::NoDate));
    }

    #[test]
    fn dates_outside_the_skew_window_are_refused() {
        let window = ReplayWindow::new(60, 10, START);
        let now = START + 1000;
        assert_eq!(window.admit(&[1; 32], Some(now - 60), now), Ok(()));
        assert_eq!(window.admit(&[2; 32], Some(now + 60), now), Ok(()));
        assert_eq!(
            window.admit(&[3; 32], Some(now - 61), now),
            Err(ReplayError::TooOld(61, 60))
        );
        assert_eq!(
            window.admit(&[4; 32], Some(now + 61), now),
            Err(ReplayError::InFuture(61, 60))
        );
    }

    #[test]
    fn nothing_dated_before_the_start_is_accepted() {
        let window = ReplayWindow::new(60, 10, START);
        assert_eq!(window.not_before(), START + 1);
        for date in [START - 30, START] {
            assert_eq!(
                window.admit(&[1; 32], Some(date), START + 5),
                Err(ReplayError::BeforeStart)
            );
        }
        assert_eq!(window.admit(&[1; 32], Some(START + 1), START + 5), Ok(()));
    }

    #[test]
    fn a_full_window_fails_closed_and_never_forgets_early() {
        let window = ReplayWindow::new(60, 3, START);
        let t = START + 100;
        for i in 0..3u8 {
            assert_eq!(window.admit(&[i; 32], Some(t), t), Ok(()));
        }
        // A flood of fresh keys is refused, and every remembered key stays refused.
        for i in 3..100u8 {
            assert_eq!(
                window.admit(&[i; 32], Some(t), t + 1),
                Err(ReplayError::Full)
            );
        }
        for i in 0..3u8 {
            assert!(window.seen(&[i; 32]));
            assert_eq!(
                window.admit(&[i; 32], Some(t), t + 60),
                Err(ReplayError::Replayed)
            );
        }
        // Refused keys were never remembered.
        assert!(!window.seen(&[3; 32]));
        assert_eq!(window.remembered(), 3);
        // Once the dates leave the window there is room again.
        assert_eq!(window.admit(&[7; 32], Some(t + 61), t + 61), Ok(()));
        assert_eq!(window.remembered(), 1);
    }
}
