//! Desired objects: pure functions from a custom resource (and the facts the reconciler found,
//! such as PeerIds and the addresses Kubernetes gave a Service) to the Secrets, workloads,
//! Services and PodDisruptionBudgets it should own. No I/O here, so every generated object is
//! checked by plain unit tests.

pub mod exit;
pub mod exit_keys;
pub mod relay;

use std::{collections::BTreeMap, str::FromStr};

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction,
        LocalObjectReference, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
        ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
        VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use kube::{Resource, ResourceExt as _, api::ObjectMeta};

use crate::resource::shared::Scheduling;
use sha2::{Digest as _, Sha256};

/// The one field manager for server-side apply.
pub const FIELD_MANAGER: &str = "tokengo-operator";
/// Pod-template annotation carrying a digest of the identity (the PeerId): should the Secret
/// ever hold another identity, the template changes and the pods roll, since nodes read their
/// identity at start. OHTTP keys are not in it: an exit follows its keyring in the mounted
/// Secret and serves a rotation without a restart, so rotating rolls no pod.
pub const KEYS_HASH_ANNOTATION: &str = "tokengo.io/keys-hash";
/// The node's writable state (`--data-dir`): an `emptyDir`, so the relay cache works; keys
/// never live here.
pub const DATA_DIR: &str = "/var/lib/tokengo";
/// Where the key Secret is mounted read-only (`--keys-dir`, or a per-pod directory below it
/// for exits, whose replicas each have their own keys).
pub const KEYS_DIR: &str = "/etc/tokengo/keys";
/// The data dir's size limit: it holds the node's small caches (a few KiB of JSON).
const DATA_DIR_LIMIT: &str = "16Mi";
/// The unprivileged user and group the node runs as (the images' `nonroot`, 65532).
pub const NODE_UID: i64 = 65532;
/// Seconds a stopping node pod gets before it is killed: above the node's own 30 s drain
/// (`DRAIN_DEADLINE` in node/src/config/defaults.rs: in-flight requests finish, tunnels close
/// cleanly), plus time for the process to exit.
pub const TERMINATION_GRACE_SECONDS: i64 = 45;
/// CPU a node container requests when its resource names no `resources`: a tenth of a core,
/// enough for an idle node and light traffic; no CPU limit, since throttling a forwarder adds
/// latency to every request.
pub const DEFAULT_CPU_REQUEST: &str = "100m";
/// Memory a node container requests when its resource names no `resources`.
pub const DEFAULT_MEMORY_REQUEST: &str = "128Mi";
/// Memory limit of a node container when its resource names no `resources`: about 8,000 idle
/// client connections at the relay's measured 58 KiB each (README, Performance), or an exit's
/// streams of large bodies. Set `resources` for more.
pub const DEFAULT_MEMORY_LIMIT: &str = "512Mi";

/// When the kubelet pulls a node image (`imagePullPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Every time a pod starts.
    Always,
    /// Only when the node does not have the image.
    IfNotPresent,
    /// Never (the image must be on the node).
    Never,
}

impl PullPolicy {
    /// The name Kubernetes uses.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// A pull policy name that is none of Kubernetes' three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an image pull policy (Always, IfNotPresent or Never)")]
pub struct UnknownPullPolicy(String);

impl FromStr for PullPolicy {
    type Err = UnknownPullPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "Always" => Ok(Self::Always),
            "IfNotPresent" => Ok(Self::IfNotPresent),
            "Never" => Ok(Self::Never),
            other => Err(UnknownPullPolicy(other.to_owned())),
        }
    }
}

/// Operator-wide settings the builders need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Node image used when a resource names none.
    pub node_image: String,
    /// The cluster's DNS domain, for in-cluster relay addresses.
    pub cluster_domain: String,
    /// `imagePullPolicy` of node containers. Default: none set, Kubernetes' own default
    /// (`Always` for a `:latest` or untagged image, else `IfNotPresent`).
    pub node_image_pull_policy: Option<PullPolicy>,
    /// Secrets (in each resource's namespace) node pods pull their image with. Default: none.
    pub image_pull_secrets: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            node_image: "tokengo/node:latest".to_owned(),
            cluster_domain: "cluster.local".to_owned(),
            node_image_pull_policy: None,
            image_pull_secrets: Vec::new(),
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

/// The pod-template value of [`KEYS_HASH_ANNOTATION`] for pods of the identity `peer_id`
/// (an exit's: ordinal 0's, which stands for the set, so scaling rolls no pod).
#[must_use]
pub fn identity_hash(peer_id: &str) -> String {
    digest([peer_id.as_bytes()])
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

/// Metadata of a key Secret: a child's, except that a `retained` Secret has no owner
/// reference, so it outlives its resource (and a resource re-created with the same name finds
/// its keys again).
pub(crate) fn key_secret_meta<K>(
    owner: &K,
    component: &str,
    name: String,
    retained: bool,
) -> ObjectMeta
where
    K: Resource<DynamicType = ()>,
{
    let mut meta = child_meta(owner, component, name);
    if retained {
        meta.owner_references = None;
    }
    meta
}

/// The owner references an existing key Secret should have: `current` without any reference
/// to a resource of `owner`'s kind (an earlier incarnation, or this one when the keys are
/// `retained`), plus `owner`'s controller reference unless `retained`. References to anything
/// else are kept as they are.
#[must_use]
pub fn key_secret_owners<K>(
    owner: &K,
    current: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
    retained: bool,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>
where
    K: Resource<DynamicType = ()>,
{
    let ours = |r: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference| {
        r.api_version == K::api_version(&()) && r.kind == K::kind(&())
    };
    let mut owners: Vec<_> = current.iter().filter(|r| !ours(r)).cloned().collect();
    if !retained {
        owners.extend(owner.controller_owner_ref(&()));
    }
    owners
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

/// What one node container (a relay or an exit) runs with; the rest of the container is the
/// same for every role.
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
    /// Requests and limits; `None` gives [`default_resources`].
    pub resources: Option<ResourceRequirements>,
}

/// A node container: JSON logs, the admin endpoint on all pod addresses with liveness and
/// readiness probes on it, locked down, with the key Secret mounted read-only at [`KEYS_DIR`]
/// and the writable data dir at [`DATA_DIR`].
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
        image_pull_policy: settings
            .node_image_pull_policy
            .map(|p| p.as_str().to_owned()),
        args: Some(c.args),
        env: Some(env),
        ports: Some(ports),
        liveness_probe: Some(admin_probe("/healthz", c.admin_port, 10)),
        readiness_probe: Some(admin_probe("/readyz", c.admin_port, 5)),
        resources: Some(c.resources.unwrap_or_else(default_resources)),
        security_context: Some(container_security()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: KEYS_VOLUME.to_owned(),
                mount_path: KEYS_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: DATA_VOLUME.to_owned(),
                mount_path: DATA_DIR.to_owned(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

/// Name of the key Secret's volume.
const KEYS_VOLUME: &str = "keys";
/// Name of the data dir's volume.
const DATA_VOLUME: &str = "data";

/// Requests and limits of a node container whose resource names none (the figures and why:
/// [`DEFAULT_CPU_REQUEST`], [`DEFAULT_MEMORY_REQUEST`], [`DEFAULT_MEMORY_LIMIT`]).
#[must_use]
pub fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(DEFAULT_CPU_REQUEST.to_owned())),
            (
                "memory".to_owned(),
                Quantity(DEFAULT_MEMORY_REQUEST.to_owned()),
            ),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity(DEFAULT_MEMORY_LIMIT.to_owned()),
        )])),
        ..Default::default()
    }
}

/// What differs between the relay's and the exit's pods.
pub(crate) struct NodePod<'a, K> {
    /// The resource whose pods these are.
    pub owner: &'a K,
    /// `relay` or `exit`.
    pub component: &'static str,
    /// Where the pods may run.
    pub scheduling: &'a Scheduling,
    /// The pod-template annotation [`KEYS_HASH_ANNOTATION`] ([`identity_hash`]): a new value
    /// rolls the pods.
    pub keys_hash: String,
    /// The pod's containers.
    pub containers: Vec<Container>,
    /// The key Secret and which of its keys become which files under [`KEYS_DIR`]
    /// (`defaultMode` is set here).
    pub keys: SecretVolumeSource,
    /// Further volumes the containers mount (the exit's access tokens).
    pub extra_volumes: Vec<Volume>,
}

/// A node pod template: labelled with the resource's labels, the key Secret as a volume
/// (group-readable only: the pod's fsGroup is the node's group), an `emptyDir` data dir, the
/// operator's image pull Secrets, a grace period above the node's drain, and no access to the
/// Kubernetes API (the node never talks to it).
pub(crate) fn node_pod_template<K>(settings: &Settings, p: NodePod<'_, K>) -> PodTemplateSpec
where
    K: Resource<DynamicType = ()>,
{
    let instance = p.owner.name_any();
    let mut pod_labels = labels(p.component, &instance);
    pod_labels.extend(selector(p.component, &instance));
    let keys = Volume {
        name: KEYS_VOLUME.to_owned(),
        secret: Some(SecretVolumeSource {
            default_mode: Some(0o440),
            ..p.keys
        }),
        ..Default::default()
    };
    let data = Volume {
        name: DATA_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(DATA_DIR_LIMIT.to_owned())),
            ..Default::default()
        }),
        ..Default::default()
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(BTreeMap::from([(
                KEYS_HASH_ANNOTATION.to_owned(),
                p.keys_hash,
            )])),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: p.containers,
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(pod_security()),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            image_pull_secrets: non_empty_vec(
                settings
                    .image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect(),
            ),
            node_selector: non_empty(p.scheduling.node_selector.clone()),
            tolerations: non_empty_vec(p.scheduling.tolerations.clone()),
            affinity: p.scheduling.affinity.clone(),
            volumes: Some([keys, data].into_iter().chain(p.extra_volumes).collect()),
            ..Default::default()
        }),
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

    use crate::resource::{TokenGoRelay, TokenGoRelaySpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    #[test]
    fn pull_policies_parse_by_their_kubernetes_names() {
        for policy in [
            PullPolicy::Always,
            PullPolicy::IfNotPresent,
            PullPolicy::Never,
        ] {
            assert_eq!(policy.as_str().parse::<PullPolicy>(), Ok(policy));
        }
        let error = "always".parse::<PullPolicy>().unwrap_err();
        assert!(
            error.to_string().contains("Always, IfNotPresent or Never"),
            "{error}"
        );
    }

    #[test]
    fn default_resources_request_and_cap_memory_but_not_cpu() {
        let r = default_resources();
        let requests = r.requests.unwrap();
        assert_eq!(requests["cpu"].0, DEFAULT_CPU_REQUEST);
        assert_eq!(requests["memory"].0, DEFAULT_MEMORY_REQUEST);
        let limits = r.limits.unwrap();
        assert_eq!(limits.len(), 1, "no CPU limit: throttling adds latency");
        assert_eq!(limits["memory"].0, DEFAULT_MEMORY_LIMIT);
    }

    #[test]
    fn the_drain_fits_in_the_grace_period() {
        let drain = tokengo::config::defaults::DRAIN_DEADLINE.as_secs();
        assert!(
            u64::try_from(TERMINATION_GRACE_SECONDS).unwrap() > drain + 10,
            "{TERMINATION_GRACE_SECONDS} s vs a {drain} s drain"
        );
    }

    fn reference(kind: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "tokengo.io/v1alpha1".into(),
            kind: kind.into(),
            name: "edge".into(),
            uid: uid.into(),
            controller: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn key_secret_owners_follow_retention() {
        let spec: TokenGoRelaySpec = serde_json::from_value(serde_json::json!({})).unwrap();
        let mut relay = TokenGoRelay::new("edge", spec);
        relay.metadata.uid = Some("new".into());
        let stale = reference("TokenGoRelay", "old");
        let foreign = OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            controller: None,
            ..reference("ConfigMap", "cm")
        };
        // Retained: no reference to any relay, foreign ones untouched.
        assert_eq!(
            key_secret_owners(&relay, &[stale.clone(), foreign.clone()], true),
            vec![foreign.clone()]
        );
        // Owned: exactly this relay's controller reference, the stale one replaced.
        assert_eq!(
            key_secret_owners(&relay, &[stale, foreign.clone()], false),
            vec![foreign, reference("TokenGoRelay", "new")]
        );
        let current = [reference("TokenGoRelay", "new")];
        assert_eq!(key_secret_owners(&relay, &current, false), current.to_vec());
    }

    #[test]
    fn digest_separates_parts() {
        assert_ne!(digest([&b"ab"[..], b"c"]), digest([&b"a"[..], b"bc"]));
        assert_eq!(digest([&b"x"[..]]), digest([&b"x"[..]]));
        assert_eq!(digest([&b"x"[..]]).len(), 64);
    }
}
