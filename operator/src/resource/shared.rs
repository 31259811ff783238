//! Spec and status pieces both resources share: scheduling, the `Ready` condition and its
//! reasons, and the schema helpers for constraints the API server enforces (Kubernetes 1.20 has
//! no CEL, so every rule is an OpenAPI constraint: enums, ranges, patterns, required fields).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Affinity, Toleration},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where pods may run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Labels a node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// The type of the condition every resource reports.
pub const READY: &str = "Ready";

/// Why a resource is or is not `Ready`: the `reason` of its `Ready` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyReason {
    /// Every desired replica is available.
    Available,
    /// Children exist; pods are not (all) available yet.
    Progressing,
    /// The TokenGoRelay the exit names does not exist.
    RelayNotFound,
    /// The TokenGoRelay the exit names has no identity yet.
    RelayNotReady,
    /// The relay is to announce itself on the DHT but has no external IP address to announce,
    /// so nobody would find it; it runs (its pods may be ready) but is not `Ready`.
    NoExternalAddress,
    /// The relay is to announce itself on the DHT behind a `NodePort` Service whose node
    /// ports differ from the ports the node announces (its own): whoever found it could not
    /// reach it. It runs but is not `Ready`; the message says what to set.
    NodePortsDiffer,
    /// The operator-managed key Secret exists but cannot be read as keys; it is never
    /// overwritten, so a person must look.
    InvalidKeySecret,
    /// Reconciling failed; the message says why; it is retried with backoff.
    ReconcileFailed,
}

impl ReadyReason {
    /// The reason as written into the condition (CamelCase, as Kubernetes requires).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "Available",
            Self::Progressing => "Progressing",
            Self::RelayNotFound => "RelayNotFound",
            Self::RelayNotReady => "RelayNotReady",
            Self::NoExternalAddress => "NoExternalAddress",
            Self::NodePortsDiffer => "NodePortsDiffer",
            Self::InvalidKeySecret => "InvalidKeySecret",
            Self::ReconcileFailed => "ReconcileFailed",
        }
    }

    /// Whether this reason means `Ready=True`.
    #[must_use]
    pub fn is_ready(self) -> bool {
        matches!(self, Self::Available)
    }
}

/// The `Ready` condition for `reason`. `lastTransitionTime` is kept from `previous` when the
/// status does not change, so re-reconciling an unchanged resource writes nothing.
#[must_use]
pub fn ready_condition(
    previous: &[Condition],
    reason: ReadyReason,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if reason.is_ready() { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == READY && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: reason.as_str().to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Schema for a container image reference: non-empty, no whitespace.
pub(crate) fn image_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 512,
        "pattern": "^[^\\s]+$",
        "nullable": true,
    })
}

/// A multiaddr the node can dial or announce: `/ip4|ip6|dns|dns4|dns6/HOST/…`.
pub(crate) const MULTIADDR_PATTERN: &str = r"^/(ip4|ip6|dns|dns4|dns6)/[^/\s]+(/[^/\s]+)+$";

/// A Kademlia protocol name: starts with `/`, no whitespace.
pub(crate) const DHT_PROTOCOL_PATTERN: &str = r"^/[^\s]+$";

/// A Kubernetes object name (RFC 1123 label, as Secrets, Services and relays need).
pub(crate) const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_kept_while_status_holds() {
        let t0: Timestamp = "2024-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2024-01-02T00:00:00Z".parse().unwrap();
        let first = ready_condition(&[], ReadyReason::Progressing, "waiting".into(), Some(1), t0);
        assert_eq!(first.status, "False");
        assert_eq!(first.last_transition_time, Time(t0));
        // Same status, other reason: the transition time stays.
        let second = ready_condition(
            std::slice::from_ref(&first),
            ReadyReason::RelayNotReady,
            "no peer".into(),
            Some(2),
            t1,
        );
        assert_eq!(second.last_transition_time, Time(t0));
        assert_eq!(second.reason, "RelayNotReady");
        // Status flips: new transition time.
        let third = ready_condition(&[second], ReadyReason::Available, "ok".into(), Some(2), t1);
        assert_eq!(third.status, "True");
        assert_eq!(third.last_transition_time, Time(t1));
    }
}
