//! Desired objects: pure functions from a custom resource (and the facts the reconciler found,
//! such as PeerIds) to the Secrets, Deployments and Services it should own. No I/O here, so
//! every generated object is checked by plain unit tests.

pub mod exit;
pub mod relay;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, HTTPGetAction, PodSecurityContext, Probe, SeccompProfile, SecurityContext,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{Resource, ResourceExt as _, api::ObjectMeta};
use sha2::{Digest as _, Sha256};

/// The one field manager for server-side apply.
pub const FIELD_MANAGER: &str = "tokengo-operator";
/// Pod-template annotation carrying a digest of the keys' public parts: when keys change (a
/// rotation), the template changes and the pods roll, since nodes read keys at start.
pub const KEYS_HASH_ANNOTATION: &str = "tokengo.io/keys-hash";
/// Where the key Secret is mounted and what `--data-dir` names.
pub const DATA_DIR: &str = "/var/lib/tokengo";
/// The unprivileged user and group the node runs as (the images' `nonroot`, 65532).
pub const NODE_UID: i64 = 65532;

/// Operator-wide settings the builders need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Node image used when a resource names none.
    pub node_image: String,
    /// The cluster's DNS domain, for in-cluster relay addresses.
    pub cluster_domain: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            node_image: "tokengo/node:latest".to_owned(),
            cluster_domain: "cluster.local".to_owned(),
        }
    }
}

/// Longest resource name: children add up to 16 characters and Service names are DNS labels.
pub const MAX_NAME_LEN: usize = 47;

/// Labels on every child and the pods; the first two are the selector.
pub(crate) fn labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            format!("tokengo-{component}"),
        ),
        ("app.kubernetes.io/instance".to_owned(), instance.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            FIELD_MANAGER.to_owned(),
        ),
    ])
}

/// The labels that select a resource's pods (stable across operator versions: selectors are
/// immutable on Deployments).
pub(crate) fn selector(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            format!("tokengo-{component}"),
        ),
        ("app.kubernetes.io/instance".to_owned(), instance.to_owned()),
    ])
}

/// Hex SHA-256 over the parts, each length-prefixed so the parts cannot run together.
#[must_use]
pub fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Pod security: non-root, RuntimeDefault seccomp; the Secret's files readable through the group.
pub(crate) fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NODE_UID),
        run_as_group: Some(NODE_UID),
        fs_group: Some(NODE_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container security: read-only root, no privilege escalation, no capabilities.
pub(crate) fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An HTTP probe on the node's admin endpoint (`/healthz` or `/readyz`).
pub(crate) fn admin_probe(path: &str, port: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// Metadata of a child: in its resource's namespace, labelled as the resource's `component`,
/// and owned by the resource (controller reference), so deleting the resource lets
/// Kubernetes' garbage collector delete the children.
pub(crate) fn child_meta<K>(owner: &K, component: &str, name: String) -> ObjectMeta
where
    K: Resource<DynamicType = ()>,
{
    ObjectMeta {
        name: Some(name),
        namespace: owner.namespace(),
        labels: Some(labels(component, &owner.name_any())),
        owner_references: owner.controller_owner_ref(&()).map(|owner| vec![owner]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_separates_parts() {
        assert_ne!(digest([&b"ab"[..], b"c"]), digest([&b"a"[..], b"bc"]));
        assert_eq!(digest([&b"x"[..]]), digest([&b"x"[..]]));
        assert_eq!(digest([&b"x"[..]]).len(), 64);
    }
}
