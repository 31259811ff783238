//! Desired objects: pure functions from a custom resource (and the facts the reconciler found,
//! such as PeerIds) to the Secrets, Deployments and Services it should own. No I/O here, so
//! every generated object is checked by plain unit tests.

pub mod exit;
pub mod relay;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, KeyToPath,
            PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
            SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::{Resource, ResourceExt as _, api::ObjectMeta};

use crate::resource::shared::Scheduling;
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

/// A literal environment variable.
pub(crate) fn plain_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..Default::default()
    }
}

/// The DHT the node joins: `TOKENGO_BOOTSTRAP` (comma-separated; none = the public DHT) and
/// `TOKENGO_DHT_PROTOCOL`, each only when set.
pub(crate) fn dht_env(bootstrap: &[String], protocol: Option<&str>) -> Vec<EnvVar> {
    let mut env = Vec::new();
    if !bootstrap.is_empty() {
        env.push(plain_env("TOKENGO_BOOTSTRAP", bootstrap.join(",")));
    }
    if let Some(protocol) = protocol {
        env.push(plain_env("TOKENGO_DHT_PROTOCOL", protocol.to_owned()));
    }
    env
}

/// What one node container (a relay, or an exit for one relay) runs with; the rest of the
/// container is the same for every role.
pub(crate) struct NodeContainer<'a> {
    /// Container name, unique in the pod.
    pub name: String,
    /// The resource's image, if it names one.
    pub image: Option<&'a String>,
    /// The node's command line.
    pub args: Vec<String>,
    /// Environment after the log format and admin address.
    pub env: Vec<EnvVar>,
    /// Ports before the admin port.
    pub ports: Vec<ContainerPort>,
    /// Name of the admin port.
    pub admin_port_name: String,
    /// The admin endpoint's port (probes and `TOKENGO_ADMIN_LISTEN`).
    pub admin_port: i32,
    /// Requests and limits.
    pub resources: Option<ResourceRequirements>,
}

/// A node container: JSON logs, the admin endpoint on all pod addresses with liveness and
/// readiness probes on it, locked down, with the keys Secret mounted read-only as its data dir.
pub(crate) fn node_container(settings: &Settings, c: NodeContainer<'_>) -> Container {
    let mut env = vec![
        plain_env("TOKENGO_LOG_FORMAT", "json".to_owned()),
        plain_env("TOKENGO_ADMIN_LISTEN", format!("0.0.0.0:{}", c.admin_port)),
    ];
    env.extend(c.env);
    let mut ports = c.ports;
    ports.push(ContainerPort {
        name: Some(c.admin_port_name),
        container_port: c.admin_port,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    });
    Container {
        name: c.name,
        image: Some(c.image.unwrap_or(&settings.node_image).clone()),
        args: Some(c.args),
        env: Some(env),
        ports: Some(ports),
        liveness_probe: Some(admin_probe("/healthz", c.admin_port, 10)),
        readiness_probe: Some(admin_probe("/readyz", c.admin_port, 5)),
        resources: c.resources,
        security_context: Some(container_security()),
        volume_mounts: Some(vec![VolumeMount {
            name: "keys".to_owned(),
            mount_path: DATA_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// What differs between the relay's and the exit's Deployment.
pub(crate) struct NodeWorkload<'a, K> {
    /// The resource that owns the Deployment.
    pub owner: &'a K,
    /// `relay` or `exit`.
    pub component: &'static str,
    /// The Deployment's name.
    pub name: String,
    /// Pod count.
    pub replicas: i32,
    /// Where the pods may run.
    pub scheduling: &'a Scheduling,
    /// The pod-template annotation [`KEYS_HASH_ANNOTATION`]: a new value rolls the pods.
    pub keys_hash: String,
    /// The pod's containers.
    pub containers: Vec<Container>,
    /// The Secret mounted as the data dir, and which of its keys become files.
    pub keys_secret: String,
    /// The files.
    pub key_files: &'a [&'a str],
    /// Further volumes the containers mount (the exit's access tokens).
    pub extra_volumes: Vec<Volume>,
}

/// A node Deployment: owned by its resource, pods selected by the resource's labels, with the
/// keys Secret as a volume (group-readable only: the pod's fsGroup is the node's group) and no
/// access to the Kubernetes API (the node never talks to it).
pub(crate) fn node_deployment<K>(w: NodeWorkload<'_, K>) -> Deployment
where
    K: Resource<DynamicType = ()>,
{
    let instance = w.owner.name_any();
    let mut pod_labels = labels(w.component, &instance);
    pod_labels.extend(selector(w.component, &instance));
    let keys = Volume {
        name: "keys".to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(w.keys_secret),
            default_mode: Some(0o440),
            items: Some(
                w.key_files
                    .iter()
                    .map(|file| KeyToPath {
                        key: (*file).to_owned(),
                        path: (*file).to_owned(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    Deployment {
        metadata: child_meta(w.owner, w.component, w.name),
        spec: Some(DeploymentSpec {
            replicas: Some(w.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(w.component, &instance)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        KEYS_HASH_ANNOTATION.to_owned(),
                        w.keys_hash,
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: w.containers,
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security()),
                    node_selector: non_empty(w.scheduling.node_selector.clone()),
                    tolerations: non_empty_vec(w.scheduling.tolerations.clone()),
                    affinity: w.scheduling.affinity.clone(),
                    volumes: Some(std::iter::once(keys).chain(w.extra_volumes).collect()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn non_empty(map: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then_some(map)
}

fn non_empty_vec<T>(items: Vec<T>) -> Option<Vec<T>> {
    (!items.is_empty()).then_some(items)
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
