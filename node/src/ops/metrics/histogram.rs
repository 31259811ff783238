//! Latency histograms with fixed buckets that `/status` can read back for percentiles.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder},
    metrics::{MetricType, TypedMetric},
};

/// Upper bounds (seconds) of the latency histograms: sub-millisecond gateway overhead up to
/// the backend idle timeout of a long generation.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// A latency histogram with fixed buckets whose counts can also be read back, so `/status`
/// can report percentiles from the same data Prometheus scrapes.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    inner: Arc<Mutex<HistogramState>>,
}

#[derive(Debug, Clone)]
struct HistogramState {
    sum: f64,
    count: u64,
    /// Non-cumulative counts, one per bound in `LATENCY_BUCKETS` plus the overflow bucket.
    buckets: Vec<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new(HistogramState {
                sum: 0.0,
                count: 0,
                buckets: vec![0; LATENCY_BUCKETS.len() + 1],
            })),
        }
    }
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let index = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        let mut state = self.lock();
        state.sum += seconds;
        state.count += 1;
        if let Some(bucket) = state.buckets.get_mut(index) {
            *bucket += 1;
        }
    }

    /// The current counts.
    #[must_use]
    pub fn snapshot(&self) -> HistogramSnapshot {
        let state = self.lock();
        HistogramSnapshot {
            count: state.count,
            sum: state.sum,
            buckets: state.buckets.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HistogramState> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot();
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(snapshot.buckets.iter().copied())
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            snapshot.sum,
            snapshot.count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Counts of a [`LatencyHistogram`] at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations.
    pub count: u64,
    /// Sum of observations in seconds.
    pub sum: f64,
    /// Non-cumulative bucket counts (the last is the overflow bucket).
    pub buckets: Vec<u64>,
}

impl HistogramSnapshot {
    /// An empty snapshot.
    #[must_use]
    pub fn empty() -> Self {
        Self {
            count: 0,
            sum: 0.0,
            buckets: vec![0; LATENCY_BUCKETS.len() + 1],
        }
    }

    /// Adds another snapshot's counts (same buckets).
    #[must_use]
    pub fn merge(mut self, other: &Self) -> Self {
        self.count += other.count;
        self.sum += other.sum;
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self
    }

    /// The `q` quantile (0..=1) in seconds, interpolated linearly within its bucket the way
    /// Prometheus' `histogram_quantile` does; `None` without observations. Values in the
    /// overflow bucket report the largest finite bound.
    #[must_use]
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for (index, count) in self.buckets.iter().enumerate() {
            let upto = below + count;
            if (upto as f64) >= rank && *count > 0 {
                let Some(&upper) = LATENCY_BUCKETS.get(index) else {
                    return LATENCY_BUCKETS.last().copied();
                };
                let lower = index
                    .checked_sub(1)
                    .and_then(|i| LATENCY_BUCKETS.get(i))
                    .copied()
                    .unwrap_or(0.0);
                let within = (rank - below as f64) / *count as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            below = upto;
        }
        LATENCY_BUCKETS.last().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_within_buckets() {
        let histogram = LatencyHistogram::default();
        assert_eq!(histogram.snapshot().quantile(0.5), None);
        for _ in 0..90 {
            histogram.observe(Duration::from_micros(300));
        }
        for _ in 0..10 {
            histogram.observe(Duration::from_millis(40));
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 100);
        let p50 = snapshot.quantile(0.5).unwrap();
        assert!(p50 > 0.0 && p50 <= 0.0005, "{p50}");
        let p99 = snapshot.quantile(0.99).unwrap();
        assert!(p99 > 0.025 && p99 <= 0.05, "{p99}");
        histogram.observe(Duration::from_secs(1000));
        assert_eq!(histogram.snapshot().quantile(1.0), Some(300.0));
    }
}
