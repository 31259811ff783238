//! Prometheus metrics of the operator: reconciliations by kind and outcome, their duration,
//! errors by kind and reason, keys made and rotated, and whether this replica is the leader.

use std::{sync::atomic::AtomicI64, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Reconcile-duration buckets: 5 ms to about 41 s, doubling (a reconcile is a handful of API
/// calls; a slow API server or a rotation shows in the upper buckets).
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// The operator's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciliations: Family<ReconcileLabels, Counter>,
    durations: Family<KindLabels, Histogram, fn() -> Histogram>,
    errors: Family<ErrorLabels, Counter>,
    identities_created: Counter,
    keys_rotated: Counter,
    leader: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tokengo_operator");
        let reconciliations = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciliations by resource kind and result",
            reconciliations.clone(),
        );
        let durations = Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took, by resource kind (successful or not)",
            durations.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "errors",
            "Reconcile errors and controller (watch) errors, by resource kind and reason; \
             the operator's log has each one at warn level with what to do",
            errors.clone(),
        );
        let identities_created = Counter::default();
        registry.register(
            "key_secrets_created",
            "Identity/key Secrets created",
            identities_created.clone(),
        );
        let keys_rotated = Counter::default();
        registry.register(
            "ohttp_key_rotations",
            "OHTTP key rotations",
            keys_rotated.clone(),
        );
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciliations,
            durations,
            errors,
            identities_created,
            keys_rotated,
            leader,
        }
    }

    /// Counts one reconciliation.
    pub fn reconciled(&self, kind: &'static str, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.reconciliations
            .get_or_create(&ReconcileLabels { kind, result })
            .inc();
    }

    /// Records how long one reconciliation of a `kind` took.
    pub fn reconcile_took(&self, kind: &'static str, took: Duration) {
        self.durations
            .get_or_create(&KindLabels { kind })
            .observe(took.as_secs_f64());
    }

    /// Counts one error of the `kind` controller, for `reason` (a short snake_case word).
    pub fn error(&self, kind: &'static str, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { kind, reason })
            .inc();
    }

    /// Counts a key Secret created.
    pub fn identity_created(&self) {
        self.identities_created.inc();
    }

    /// Counts a key rotation.
    pub fn keys_rotated(&self) {
        self.keys_rotated.inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The OpenMetrics text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_up_in_the_exposition() {
        let metrics = Metrics::new();
        metrics.reconciled("TokenGoExit", true);
        metrics.reconciled("TokenGoExit", true);
        metrics.reconciled("TokenGoRelay", false);
        metrics.keys_rotated();
        metrics.set_leader(true);
        metrics.reconcile_took("TokenGoExit", Duration::from_millis(30));
        metrics.reconcile_took("TokenGoExit", Duration::from_secs(100));
        metrics.error("TokenGoRelay", "forbidden");
        metrics.error("TokenGoRelay", "forbidden");
        metrics.error("TokenGoExit", "watch_failed");
        let text = metrics.render();
        assert!(
            text.contains(
                r#"tokengo_operator_reconciliations_total{kind="TokenGoExit",result="success"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"tokengo_operator_reconciliations_total{kind="TokenGoRelay",result="error"} 1"#
        ));
        assert!(text.contains("tokengo_operator_ohttp_key_rotations_total 1"));
        assert!(text.contains("tokengo_operator_leader 1"));
        assert!(
            text.contains(
                r#"tokengo_operator_errors_total{kind="TokenGoRelay",reason="forbidden"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"tokengo_operator_errors_total{kind="TokenGoExit",reason="watch_failed"} 1"#
        ));
        assert!(text.contains(
            r#"tokengo_operator_reconcile_duration_seconds_count{kind="TokenGoExit"} 2"#
        ));
        // 30 ms falls in the 40 ms bucket; 100 s only in +Inf.
        let bucket = |le: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("tokengo_operator_reconcile_duration_seconds_bucket{")
                        && l.contains(&format!(r#"le="{le}""#))
                        && l.contains(r#"kind="TokenGoExit""#)
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(bucket("0.02").as_deref(), Some("0"), "{text}");
        assert_eq!(bucket("0.04").as_deref(), Some("1"), "{text}");
        assert_eq!(bucket("+Inf").as_deref(), Some("2"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
