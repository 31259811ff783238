//! `TokenGoExit`: an exit (decrypts requests, calls the AI backend) run as a StatefulSet that
//! dials its relays. Each pod runs one `tokengo exit` container given every relay address
//! (`--relay` each; the node keeps a tunnel to each), so the exit is reachable through every
//! relay it names; with DHT discovery, the container finds and registers with up to
//! `maxRelays` relays itself.
//!
//! **One identity per replica.** Replica `i` (pod `<name>-exit-<i>`) has its own Ed25519
//! identity (PeerId) and OHTTP keyring, all held in the one key Secret and mounted at
//! `/etc/tokengo/keys/<pod>/`. A relay keeps one tunnel per PeerId and closes the older one, so
//! replicas sharing an identity would evict each other forever; a StatefulSet never runs two
//! pods of one ordinal at once (rolling updates included), so no two processes ever hold one
//! identity. Why not several tunnels per identity at the relay instead: each replica keeps its
//! own replay window (with one shared key, a captured request could be executed once per
//! replica), a restarted exit still takes over its tunnel at once, and the protocol stays as
//! it is. The cost: clients pin the list of PeerIds (`tokengo client --exit A --exit B`), which
//! `status.identities` gives. Identities are created once per ordinal and never replaced;
//! scaling down keeps them, so scaling back up brings the same PeerIds back.

use k8s_openapi::{
    api::core::v1::ResourceRequirements, apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::relay::default_admin_port;
use super::shared::{
    DHT_PROTOCOL_PATTERN, MULTIADDR_PATTERN, NAME_PATTERN, Scheduling, image_schema,
};

/// `http://` or `https://` base URL without query or fragment (what the node accepts).
const URL_PATTERN: &str = r"^https?://[^\s?#]+$";
/// An HTTP header name (RFC 9110 token).
const HEADER_NAME_PATTERN: &str = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";
/// A Secret data key.
const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// Printable header value characters (no control characters, so no header injection).
const HEADER_VALUE_PATTERN: &str = r"^[\x20-\x7e\t]*$";

/// The most relays one exit registers with (one `--relay` each).
pub const MAX_RELAYS: usize = 8;
/// The most replicas an exit may have (the schema's bound on `replicas`): the key Secret's
/// volume maps the files of this many ordinals, so the pod template never depends on
/// `replicas` and scaling never rolls the running pods.
pub const MAX_REPLICAS: i32 = 20;

/// A TokenGo exit.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tokengo.io",
    version = "v1alpha1",
    kind = "TokenGoExit",
    namespaced,
    status = "TokenGoExitStatus",
    shortname = "tgexit",
    category = "tokengo",
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"}"#,
    printcolumn = r#"{"name": "Backend", "type": "string", "jsonPath": ".spec.backend.url"}"#,
    printcolumn = r#"{"name": "PeerId", "type": "string", "jsonPath": ".status.peerId", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TokenGoExitSpec {
    /// Pods (a StatefulSet), each with an identity (PeerId) and OHTTP keyring of its own in
    /// the key Secret; clients pin every replica's PeerId (`status.identities`). Scaling down
    /// keeps the identities of the removed replicas, so scaling back up restores their PeerIds.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 20))]
    pub replicas: i32,
    /// Keep the key Secret (`<name>-exit-keys`: every replica's identity and OHTTP keys) when
    /// the exit is deleted, so an exit re-created with the same name has the same PeerIds,
    /// which clients pin (`--exit PEERID`): the same reason a relay keeps its identity. Default
    /// true. When false the Secret is owned by the exit and garbage-collected with it. To
    /// really delete kept keys: `kubectl delete secret <name>-exit-keys`.
    #[serde(default = "yes")]
    pub retain_identity: bool,
    /// Container image of the `tokengo` node (default: the operator's `--node-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "image_schema")]
    pub image: Option<String>,
    /// Port of the node's admin endpoint (`/healthz`, `/readyz`, `/metrics`) the probes use.
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1, max = 65000))]
    pub admin_port: i32,
    /// The AI backend the exit calls.
    pub backend: ExitBackend,
    /// Which relays the exit registers with.
    pub relay: ExitRelay,
    /// Serve the public (`TOKENGO_PUBLIC`): anyone who finds the exit may use it and its
    /// backend credentials. Default false: the exit serves only through the relays it is
    /// given. `relay.dht` discovers relays on the DHT, which makes the exit public whatever
    /// this says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// Secret key holding the group access tokens (one per line), mounted as the exit's
    /// `--access-token-file`: only requests carrying one of them reach the backend. Updating
    /// the Secret takes effect without restarting the pods. Default: no token required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_tokens_secret: Option<SecretKeyRef>,
    /// When the OHTTP key is replaced.
    #[serde(default)]
    pub key_rotation: KeyRotation,
    /// CPU and memory requests and limits of the exit container. Default: requests of 100m
    /// CPU and 128Mi memory and a 512Mi memory limit, no CPU limit (throttling adds latency);
    /// given here, they replace the default entirely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the pods may run.
    #[serde(default)]
    pub scheduling: Scheduling,
}

/// The backend: where requests go and with which credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExitBackend {
    /// Base URL, e.g. `http://ollama.models.svc:11434`.
    #[schemars(length(min = 8, max = 2048), pattern(URL_PATTERN))]
    pub url: String,
    /// Secret key holding the API key, sent as `Authorization: Bearer …`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// Extra headers for every backend request (not secret: they are in the pod spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub headers: Vec<Header>,
}

/// A key of a Secret in the exit's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253), pattern(NAME_PATTERN))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253), pattern(SECRET_KEY_PATTERN))]
    pub key: String,
}

/// One extra backend header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// Header name.
    #[schemars(length(min = 1, max = 128), pattern(HEADER_NAME_PATTERN))]
    pub name: String,
    /// Header value.
    #[schemars(length(max = 4096), pattern(HEADER_VALUE_PATTERN))]
    pub value: String,
}

/// Exactly one way to find relays: a `TokenGoRelay` by name, explicit multiaddrs, or the DHT.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["name"]},
    {"required": ["addresses"]},
    {"required": ["dht"]}
]))]
pub struct ExitRelay {
    /// A `TokenGoRelay` in the exit's namespace; its PeerId and in-cluster address are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(NAME_PATTERN))]
    pub name: Option<String>,
    /// Relay multiaddrs with `/p2p/PEERID`, e.g. `/dns4/relay.example/udp/4433/quic-v1/p2p/12D3Koo…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8), inner(pattern(MULTIADDR_PATTERN)))]
    pub addresses: Option<Vec<String>>,
    /// Find relays on the DHT: one exit container without a relay address discovers them at
    /// start. `status.relays` stays empty (the pods choose; see their `/status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dht: Option<ExitDht>,
}

/// DHT discovery settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExitDht {
    /// Bootstrap peers (multiaddrs with `/p2p/`), passed as `TOKENGO_BOOTSTRAP`. Default empty:
    /// the public Amino DHT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(pattern(MULTIADDR_PATTERN)))]
    pub bootstrap: Vec<String>,
    /// Kademlia protocol name (`TOKENGO_DHT_PROTOCOL`), e.g. `/mynet/kad/1.0.0` for a private
    /// network. Default: the node's, `/ipfs/kad/1.0.0` (the public DHT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 128), pattern(DHT_PROTOCOL_PATTERN))]
    pub protocol: Option<String>,
    /// Most discovered relays each pod registers with (`TOKENGO_MAX_RELAYS`). Default: the
    /// node's, 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub max_relays: Option<i32>,
}

/// OHTTP key rotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotation {
    /// Hours between rotations. The operator rotates every replica's keyring (in the key
    /// Secret); each running pod reads its keyring again when the kubelet updates the mounted
    /// Secret and serves the new key without a restart. The pods' own rotation schedule is
    /// off, since their keys are in the read-only Secret and a key a pod made itself would be
    /// lost on its next start. The previous key stays valid until the next rotation, so
    /// clients holding it have a whole interval to refresh.
    #[serde(default = "default_interval_hours")]
    #[schemars(range(min = 1, max = 8760))]
    pub interval_hours: i32,
}

impl Default for KeyRotation {
    fn default() -> Self {
        Self {
            interval_hours: default_interval_hours(),
        }
    }
}

/// What the operator reports about an exit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenGoExitStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The PeerId of replica 0 (its id at the relays); every replica's is in `identities`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    /// The OHTTP keys of replica 0, current first; every replica's are in `identities`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<PublishedKey>,
    /// Every replica's identity and keys, by ordinal: the PeerIds clients pin
    /// (`tokengo client --exit A --exit B …`). Identities of ordinals at or above `replicas`
    /// (kept after scaling down) are not listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<ReplicaIdentity>,
    /// The relay addresses the exit registers with; empty with DHT discovery (each pod finds
    /// its relays at start).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<String>,
    /// Pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
}

/// One replica's public identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaIdentity {
    /// The StatefulSet ordinal (pod `<name>-exit-<ordinal>`).
    pub ordinal: i32,
    /// The replica's PeerId.
    pub peer_id: String,
    /// The replica's OHTTP keys, current first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<PublishedKey>,
}

/// The public part of one OHTTP key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishedKey {
    /// OHTTP key id.
    pub key_id: i32,
    /// RFC 9458 key configuration, hex.
    pub config: String,
    /// When the key was created (RFC 3339).
    pub created_at: String,
}

fn one() -> i32 {
    1
}

fn yes() -> bool {
    true
}

fn default_interval_hours() -> i32 {
    24 * 7
}
