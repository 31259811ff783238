//! `TokenGoRelay`: a relay (blind QUIC forwarder) run as a Deployment behind a UDP Service.
//!
//! All replicas of one relay share one identity (one Secret): the relay's address names its
//! PeerId, so every pod behind the Service must be able to prove that same PeerId, during rolling
//! updates too. Registrations are held per process, so an exit must register with every pod for
//! a client to reach it through any of them: exits that name the relay (`relay.name`) are given
//! the headless Service `<relay>-relay-pods`, whose DNS name resolves to every ready pod, and the
//! node registers with each address it resolves to (re-resolving as pods come and go). Exits
//! that reach the relay through one address only (its external address) are reachable through
//! the pod they registered with.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::ResourceRequirements, apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{DHT_PROTOCOL_PATTERN, MULTIADDR_PATTERN, Scheduling, image_schema};

/// Host names and IP literals: what `externalAddress` may hold.
const HOST_PATTERN: &str = r"^[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?$";

/// A TokenGo relay.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tokengo.io",
    version = "v1alpha1",
    kind = "TokenGoRelay",
    namespaced,
    status = "TokenGoRelayStatus",
    shortname = "tgrelay",
    category = "tokengo",
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"}"#,
    printcolumn = r#"{"name": "PeerId", "type": "string", "jsonPath": ".status.peerId", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TokenGoRelaySpec {
    /// Pods; all share the relay's one identity. They roll one at a time with a new pod up
    /// before an old one goes (`maxSurge` 1, `maxUnavailable` 0); above 1 a
    /// PodDisruptionBudget (`maxUnavailable` 1) keeps voluntary evictions to one pod at a time.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10))]
    pub replicas: i32,
    /// Keep the identity Secret (`<name>-relay-identity`) when the relay is deleted, so a relay
    /// re-created with the same name has the same PeerId and every address clients and exits
    /// were given stays valid. Default true. When false the Secret is owned by the relay and
    /// garbage-collected with it. To really delete a kept identity:
    /// `kubectl delete secret <name>-relay-identity`.
    #[serde(default = "yes")]
    pub retain_identity: bool,
    /// Container image of the `tokengo` node (default: the operator's `--node-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "image_schema")]
    pub image: Option<String>,
    /// UDP port the relay listens on and the Service exposes.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Port of the node's admin endpoint (`/healthz`, `/readyz`, `/metrics`) the probes use.
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub admin_port: i32,
    /// How the relay is exposed.
    #[serde(default)]
    pub service: RelayService,
    /// Host name or IP address clients and exits outside the cluster use to reach the Service;
    /// published in `status.addresses` (with the allocated node port for a `NodePort`
    /// Service). With `dht.announce` it must be an IP address (the node announces IPs only,
    /// with its own ports: `port` and `dhtPort` must reach the pods there unchanged, e.g. a
    /// `LoadBalancer` Service); it is passed as `TOKENGO_EXTERNAL_ADDRS`. Default: for a
    /// `LoadBalancer` Service, the load balancer's address (`status.loadBalancer.ingress[0]`, IP
    /// else host name) once it has one; otherwise none (with `dht.announce` the relay then
    /// reports `NoExternalAddress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(HOST_PATTERN))]
    pub external_address: Option<String>,
    /// UDP port of the node's libp2p (DHT) swarm, separate from `port`; used only with
    /// `dht.announce`, when the container listens on it (`TOKENGO_DHT_LISTEN`) and the Service
    /// exposes it as the UDP port `dht`. Default 4001.
    #[serde(default = "default_dht_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub dht_port: i32,
    /// DHT announcement, passed to the node (`TOKENGO_DHT_ANNOUNCE`, `TOKENGO_BOOTSTRAP`,
    /// `TOKENGO_DHT_PROTOCOL`). Default: not announced.
    #[serde(default)]
    pub dht: RelayDht,
    /// CPU and memory requests and limits of the relay container. Default: requests of 100m
    /// CPU and 128Mi memory and a 512Mi memory limit, no CPU limit (throttling adds latency);
    /// given here, they replace the default entirely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the pods may run.
    #[serde(default)]
    pub scheduling: Scheduling,
}

/// How the relay's Service looks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayService {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations for the Service (e.g. for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Fixed node port of the QUIC port for `NodePort` and `LoadBalancer` Services. Default:
    /// allocated by Kubernetes (published in `status.addresses`). A `NodePort` relay with
    /// `dht.announce` is reachable at the ports it announces only when this equals `port`
    /// and `dhtPort` is a node port too (30000-32767; the `dht` node port then follows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port: Option<i32>,
}

/// Kubernetes Service types a relay can use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only (the default: exposing is a choice).
    #[default]
    ClusterIP,
    /// Reachable on every node's address.
    NodePort,
    /// Reachable through the cloud's load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The name Kubernetes uses.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Announcing the relay on the DHT.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayDht {
    /// Announce the relay as a provider of the TokenGo relay key, so clients and exits find it
    /// on the DHT. Needs `externalAddress` as an IP address. Default false.
    #[serde(default)]
    pub announce: bool,
    /// Bootstrap peers (multiaddrs with `/p2p/`). Default empty: the public Amino DHT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(pattern(MULTIADDR_PATTERN)))]
    pub bootstrap: Vec<String>,
    /// Kademlia protocol name, e.g. `/mynet/kad/1.0.0` for a private network. Default: the
    /// node's, `/ipfs/kad/1.0.0` (the public DHT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 128), pattern(DHT_PROTOCOL_PATTERN))]
    pub protocol: Option<String>,
}

/// What the operator and the relay report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenGoRelayStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The relay's PeerId (public; derived from its identity key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    /// Multiaddrs to hand to clients and exits: in-cluster DNS first, then the external address
    /// (the QUIC port, or its node port for a `NodePort` Service; the DHT port is not a relay
    /// address). Exits in the cluster that name the relay use the headless name
    /// `<name>-relay-pods` instead, to register with every pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
}

fn one() -> i32 {
    1
}

fn yes() -> bool {
    true
}

fn default_port() -> i32 {
    4433
}

fn default_dht_port() -> i32 {
    4001
}

pub(crate) fn default_admin_port() -> i32 {
    9090
}
