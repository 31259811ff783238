//! Replay protection for encapsulated requests. OHTTP has none (RFC 9458 §6.5): a relay, or
//! anyone who recorded a request, could send it again and make the backend run it twice. Every
//! request carries a fresh HPKE encapsulated key (`enc`), so the exit refuses an `enc` it has
//! already seen within a window.

use std::{
    collections::{HashSet, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

/// Recently seen encapsulated keys.
#[derive(Debug)]
pub(super) struct ReplayWindow {
    window: Duration,
    capacity: usize,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    set: HashSet<[u8; 32]>,
    order: VecDeque<([u8; 32], Instant)>,
}

impl ReplayWindow {
    /// Remembers keys for `window`, at most `capacity` of them (the oldest are forgotten first
    /// when a burst exceeds it; the window then shrinks to what memory allows).
    #[must_use]
    pub(super) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            seen: Mutex::default(),
        }
    }

    /// Records `enc`; returns `false` if it was already seen (a replay).
    pub(super) fn admit(&self, enc: &[u8]) -> bool {
        self.admit_at(enc, Instant::now())
    }

    fn admit_at(&self, enc: &[u8], now: Instant) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(enc) else {
            return false;
        };
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some((old, at)) = seen.order.front().copied() {
            if now.duration_since(at) < self.window && seen.order.len() < self.capacity {
                break;
            }
            seen.order.pop_front();
            seen.set.remove(&old);
        }
        if !seen.set.insert(key) {
            return false;
        }
        seen.order.push_back((key, now));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_repeats_within_the_window() {
        let window = ReplayWindow::new(Duration::from_secs(60), 10);
        let start = Instant::now();
        assert!(window.admit_at(&[1; 32], start));
        assert!(window.admit_at(&[2; 32], start));
        assert!(!window.admit_at(&[1; 32], start + Duration::from_secs(30)));
        // After the window the key is forgotten.
        assert!(window.admit_at(&[1; 32], start + Duration::from_secs(61)));
        assert!(
            !window.admit(&[0; 31]),
            "wrong-length enc is never admitted"
        );
    }

    #[test]
    fn bounded_memory() {
        let window = ReplayWindow::new(Duration::from_secs(60), 3);
        let now = Instant::now();
        for i in 0..10u8 {
            assert!(window.admit_at(&[i; 32], now));
        }
        let seen = window
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert!(seen.order.len() <= 3 && seen.set.len() <= 3);
    }
}
