//! Request rates over the last minute, from a counter sampled now and then.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A counter sampled over time, for "requests per second over the last minute" without a
/// time-series database.
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

/// How far back [`RateWindow::rate`] looks.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

impl RateWindow {
    /// Records the counter's value now.
    pub fn record(&self, total: u64) {
        self.record_at(Instant::now(), total);
    }

    /// Increase per second between the oldest kept sample and `total` now; `None` until a
    /// sample from an earlier instant exists.
    #[must_use]
    pub fn rate(&self, total: u64) -> Option<f64> {
        self.rate_at(Instant::now(), total)
    }

    /// Records the counter's value at `now`. Samples older than the window are dropped, except
    /// the newest of them, which anchors the window's start.
    fn record_at(&self, now: Instant, total: u64) {
        let mut samples = self.lock();
        samples.push_back((now, total));
        while samples.len() > 2
            && samples
                .get(1)
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    fn rate_at(&self, now: Instant, total: u64) -> Option<f64> {
        let samples = self.lock();
        let (at, then) = *samples.front()?;
        let elapsed = now.saturating_duration_since(at).as_secs_f64();
        (elapsed > 0.0).then(|| total.saturating_sub(then) as f64 / elapsed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, u64)>> {
        // Plain samples: a panic elsewhere cannot leave them inconsistent.
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_the_increase_per_second_over_the_window() {
        let window = RateWindow::default();
        let start = Instant::now();
        assert_eq!(window.rate_at(start, 5), None);
        window.record_at(start, 10);
        assert_eq!(window.rate_at(start, 10), None, "no time has passed");
        let later = start + Duration::from_secs(10);
        window.record_at(later, 30);
        assert_eq!(window.rate_at(later, 30), Some(2.0));
        // Samples older than the window stop counting; the newest of them anchors its start.
        let much_later = start + Duration::from_secs(100);
        window.record_at(much_later, 130);
        assert_eq!(window.rate_at(much_later, 130), Some(100.0 / 90.0));
    }
}
