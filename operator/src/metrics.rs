//! Prometheus metrics of the operator: reconciliations by kind and outcome, keys made and
//! rotated, and whether this replica is the leader.

use std::sync::atomic::AtomicI64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    kind: &'static str,
    result: &'static str,
}

/// The operator's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciliations: Family<ReconcileLabels, Counter>,
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
        assert!(text.ends_with("# EOF\n"));
    }
}
