//! Desired children of a `TokenGoExit`: its key Secret (one identity and OHTTP keyring per
//! replica, `exit_keys`) and a StatefulSet whose pods each run one `tokengo exit` container
//! with their own keys: registered with every relay (one `--relay` each; the node keeps a
//! tunnel to each), or with DHT discovery finding its relays itself.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{
            RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec,
            StatefulSetUpdateStrategy,
        },
        core::v1::{
            Container, EnvVar, EnvVarSource, KeyToPath, ObjectFieldSelector, Secret,
            SecretKeySelector, SecretVolumeSource, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference},
};
use kube::ResourceExt as _;
use tokengo_proto::data_dir::{EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE};

use super::{
    DATA_DIR, KEYS_DIR, NodeContainer, NodePod, Settings, child_meta, dht_env,
    exit_keys::{ExitKeySet, identity_key, keyring_key},
    key_secret_meta, node_container, node_pod_template, plain_env, selector,
};
use crate::resource::{
    TokenGoExit,
    exit::{ExitDht, MAX_REPLICAS},
};

/// Annotation on the key Secret: the last `tokengo.io/rotate` value of the exit that was acted
/// on, so a rotation request is carried out once.
pub const ROTATION_HANDLED_ANNOTATION: &str = "tokengo.io/rotation-handled";
/// Annotation a user sets (to any new value) on a `TokenGoExit` to rotate its keys now.
pub const ROTATE_ANNOTATION: &str = "tokengo.io/rotate";
const COMPONENT: &str = "exit";
/// Where the access-token Secret is mounted (a directory mount, not `subPath`, so an updated
/// Secret reaches the running exit, which re-reads the file when it changes).
pub const ACCESS_TOKENS_DIR: &str = "/etc/tokengo/access";
/// The token file in [`ACCESS_TOKENS_DIR`].
const ACCESS_TOKENS_FILE: &str = "tokens";
const ACCESS_TOKENS_VOLUME: &str = "access-tokens";

/// Name of the StatefulSet (and of the Deployment earlier operator versions made, which the
/// StatefulSet replaces).
#[must_use]
pub fn workload_name(exit: &TokenGoExit) -> String {
    format!("{}-exit", exit.name_any())
}

/// Name of replica `ordinal`'s pod (the StatefulSet's naming).
#[must_use]
pub fn pod_name(exit: &TokenGoExit, ordinal: u32) -> String {
    format!("{}-{ordinal}", workload_name(exit))
}

/// Name of the key Secret.
#[must_use]
pub fn keys_secret_name(exit: &TokenGoExit) -> String {
    format!("{}-exit-keys", exit.name_any())
}

/// The key Secret: every replica's identity and keyring (`exit_keys` layout), owned by the
/// exit unless it retains its identities. `rotation_handled` is the rotation request already
/// carried out (if any).
#[must_use]
pub fn keys_secret(
    exit: &TokenGoExit,
    keys: &ExitKeySet,
    rotation_handled: Option<&str>,
) -> Secret {
    let mut metadata = key_secret_meta(
        exit,
        COMPONENT,
        keys_secret_name(exit),
        exit.spec.retain_identity,
    );
    metadata.annotations = rotation_handled
        .map(|v| BTreeMap::from([(ROTATION_HANDLED_ANNOTATION.to_owned(), v.to_owned())]));
    Secret {
        metadata,
        type_: Some("Opaque".to_owned()),
        data: Some(keys.encode()),
        ..Default::default()
    }
}

/// The key Secret's new contents when it is rewritten: `keys`, the handled rotation request,
/// and `owners`; everything else of `current` (labels, other annotations) kept, and its
/// resource version, so the write fails with a conflict if the Secret changed since it was
/// read.
#[must_use]
pub fn rewritten_keys_secret(
    current: &Secret,
    keys: &ExitKeySet,
    rotation_handled: Option<&str>,
    owners: Vec<OwnerReference>,
) -> Secret {
    let mut secret = current.clone();
    secret.data = Some(keys.encode());
    secret.string_data = None;
    let mut annotations = secret.metadata.annotations.take().unwrap_or_default();
    match rotation_handled {
        Some(handled) => {
            annotations.insert(ROTATION_HANDLED_ANNOTATION.to_owned(), handled.to_owned());
        }
        None => {
            annotations.remove(ROTATION_HANDLED_ANNOTATION);
        }
    }
    secret.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    secret.metadata.owner_references = (!owners.is_empty()).then_some(owners);
    secret
}

/// Where the exit's container finds its relays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RelaySource<'a> {
    /// These relay multiaddrs, one `--relay` each (non-empty, at most
    /// [`crate::resource::exit::MAX_RELAYS`]).
    Addresses(&'a [String]),
    /// One container without `--relay`: the node discovers relays on this DHT.
    Dht(&'a ExitDht),
}

/// The key Secret's files as the pods see them: ordinal `i`'s under `<pod i>/`, for every
/// possible ordinal (up to [`MAX_REPLICAS`]) and `optional`, so the pod template does not
/// depend on how many replicas there are (scaling rolls no pod) and a pod finds exactly its
/// own keys at `KEYS_DIR/<pod name>` (`--keys-dir`).
fn keys_volume(exit: &TokenGoExit) -> SecretVolumeSource {
    let ordinals = 0..MAX_REPLICAS.unsigned_abs();
    SecretVolumeSource {
        secret_name: Some(keys_secret_name(exit)),
        items: Some(
            ordinals
                .flat_map(|ordinal| {
                    let pod = pod_name(exit, ordinal);
                    [
                        KeyToPath {
                            key: identity_key(ordinal),
                            path: format!("{pod}/{EXIT_IDENTITY_FILE}"),
                            ..Default::default()
                        },
                        KeyToPath {
                            key: keyring_key(ordinal),
                            path: format!("{pod}/{EXIT_KEYRING_FILE}"),
                            ..Default::default()
                        },
                    ]
                })
                .collect(),
        ),
        optional: Some(true),
        ..Default::default()
    }
}

/// The exit StatefulSet: one container per pod, registered with every relay address or
/// discovering relays on the DHT, each pod with its own keys. Pods start and stop in parallel
/// (replicas are independent) and roll one at a time, never two of one ordinal at once.
#[must_use]
pub fn stateful_set(
    exit: &TokenGoExit,
    settings: &Settings,
    relays: RelaySource<'_>,
    keys_hash: &str,
) -> StatefulSet {
    let spec = &exit.spec;
    // Discovering relays is what a public exit does: the node refuses it otherwise.
    let public = spec.public || matches!(relays, RelaySource::Dht(_));
    let mut env = Vec::new();
    if public {
        env.push(plain_env("TOKENGO_PUBLIC", "true".to_owned()));
    }
    let container = match relays {
        RelaySource::Addresses(addresses) => container(exit, settings, addresses, env),
        RelaySource::Dht(dht) => {
            env.extend(dht_env(&dht.bootstrap, dht.protocol.as_deref()));
            if let Some(max) = dht.max_relays {
                env.push(plain_env("TOKENGO_MAX_RELAYS", max.to_string()));
            }
            container(exit, settings, &[], env)
        }
    };
    let template = node_pod_template(
        settings,
        NodePod {
            owner: exit,
            component: COMPONENT,
            scheduling: &spec.scheduling,
            keys_hash: keys_hash.to_owned(),
            containers: vec![container],
            keys: keys_volume(exit),
            extra_volumes: spec
                .access_tokens_secret
                .iter()
                .map(|secret| Volume {
                    name: ACCESS_TOKENS_VOLUME.to_owned(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(secret.name.clone()),
                        default_mode: Some(0o440),
                        items: Some(vec![KeyToPath {
                            key: secret.key.clone(),
                            path: ACCESS_TOKENS_FILE.to_owned(),
                            ..Default::default()
                        }]),
                        optional: Some(false),
                    }),
                    ..Default::default()
                })
                .collect(),
        },
    );
    StatefulSet {
        metadata: child_meta(exit, COMPONENT, workload_name(exit)),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(COMPONENT, &exit.name_any())),
                ..Default::default()
            },
            // A required field naming a governing Service; exits only dial out, so none
            // exists and the pods' per-pod DNS names are never used.
            service_name: Some(workload_name(exit)),
            pod_management_policy: Some("Parallel".to_owned()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    partition: Some(0),
                    ..Default::default()
                }),
            }),
            template,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The exit container: registers with each of `relays`, or discovers relays when there are
/// none; `extra_env` follows the log and admin settings. Its keys are its pod's directory of
/// the key Secret (`$(POD_NAME)`, which Kubernetes expands from the downward API).
fn container(
    exit: &TokenGoExit,
    settings: &Settings,
    relays: &[String],
    extra_env: Vec<EnvVar>,
) -> Container {
    let spec = &exit.spec;
    let mut args = vec!["exit".to_owned()];
    for relay in relays {
        args.push("--relay".to_owned());
        args.push(relay.clone());
    }
    args.extend([
        "--backend".to_owned(),
        spec.backend.url.clone(),
        "--data-dir".to_owned(),
        DATA_DIR.to_owned(),
        "--keys-dir".to_owned(),
        format!("{KEYS_DIR}/$(POD_NAME)"),
    ]);
    for header in &spec.backend.headers {
        args.push("--header".to_owned());
        args.push(format!("{}: {}", header.name, header.value));
    }
    if spec.access_tokens_secret.is_some() {
        args.push("--access-token-file".to_owned());
        args.push(format!("{ACCESS_TOKENS_DIR}/{ACCESS_TOKENS_FILE}"));
    }
    let mut env = vec![EnvVar {
        name: "POD_NAME".to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    env.extend(extra_env);
    // The operator rotates the keys (in the Secret, which the pod follows in place): the keys
    // dir is read-only, and a key a pod rotated on its own would be lost on its next start.
    env.push(plain_env("TOKENGO_KEY_ROTATION_HOURS", "0".to_owned()));
    if let Some(secret) = &spec.backend.api_key_secret {
        // From the Secret at start, so the key is never in the pod spec.
        env.push(EnvVar {
            name: "TOKENGO_API_KEY".to_owned(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut container = node_container(
        settings,
        NodeContainer {
            name: "exit".to_owned(),
            image: spec.image.as_ref(),
            args,
            env,
            ports: Vec::new(),
            admin_port_name: "admin".to_owned(),
            admin_port: spec.admin_port,
            resources: spec.resources.clone(),
        },
    );
    if spec.access_tokens_secret.is_some() {
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: ACCESS_TOKENS_VOLUME.to_owned(),
                mount_path: ACCESS_TOKENS_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            });
    }
    container
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::TokenGoExitSpec;
    use serde_json::json;

    fn exit(spec: serde_json::Value) -> TokenGoExit {
        let spec: TokenGoExitSpec = serde_json::from_value(spec).unwrap();
        let mut exit = TokenGoExit::new("llm", spec);
        exit.metadata.namespace = Some("ai".into());
        exit.metadata.uid = Some("uid-2".into());
        exit
    }

    fn basic() -> TokenGoExit {
        exit(json!({
            "backend": {
                "url": "http://ollama.models.svc:11434",
                "apiKeySecret": {"name": "backend", "key": "token"},
                "headers": [{"name": "X-Team", "value": "ml"}]
            },
            "relay": {"name": "edge"}
        }))
    }

    const RELAYS: [&str; 2] = [
        "/dns4/edge-relay-pods.ai.svc.cluster.local/udp/4433/quic-v1/p2p/12D3KooWA",
        "/ip4/203.0.113.7/udp/4433/quic-v1/p2p/12D3KooWB",
    ];

    fn relays() -> Vec<String> {
        RELAYS.iter().map(|s| (*s).to_owned()).collect()
    }

    const POD_NAME_ENV: &str = "POD_NAME";

    /// The container every exit runs, before its role-specific args and env.
    fn pod_name_env() -> serde_json::Value {
        json!({"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    }

    #[test]
    fn a_stateful_set_of_one_container_for_every_relay_with_its_own_keys() {
        let exit = basic();
        let relays = relays();
        let set = stateful_set(
            &exit,
            &Settings::default(),
            RelaySource::Addresses(&relays),
            "hash",
        );
        let value = serde_json::to_value(&set).unwrap();
        assert_eq!(value["kind"], "StatefulSet");
        assert_eq!(value["metadata"]["name"], "llm-exit");
        assert_eq!(
            value["metadata"]["ownerReferences"][0]["kind"],
            "TokenGoExit"
        );
        let spec = &value["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(spec["podManagementPolicy"], "Parallel");
        assert_eq!(
            spec["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
        );
        assert_eq!(spec["serviceName"], "llm-exit");
        assert_eq!(
            spec["selector"],
            json!({"matchLabels": {"app.kubernetes.io/instance": "llm", "app.kubernetes.io/name": "tokengo-exit"}})
        );
        assert!(spec.get("volumeClaimTemplates").is_none());
        let pod = &spec["template"];
        assert_eq!(
            pod["metadata"]["annotations"]["tokengo.io/keys-hash"],
            "hash"
        );
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(
            containers.len(),
            1,
            "one process keeps a tunnel to each relay"
        );
        assert_eq!(
            containers[0],
            json!({
                "name": "exit",
                "image": "tokengo/node:latest",
                "args": [
                    "exit", "--relay", RELAYS[0], "--relay", RELAYS[1],
                    "--backend", "http://ollama.models.svc:11434",
                    "--data-dir", "/var/lib/tokengo",
                    "--keys-dir", "/etc/tokengo/keys/$(POD_NAME)",
                    "--header", "X-Team: ml"
                ],
                "env": [
                    {"name": "TOKENGO_LOG_FORMAT", "value": "json"},
                    {"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"},
                    pod_name_env(),
                    {"name": "TOKENGO_KEY_ROTATION_HOURS", "value": "0"},
                    {"name": "TOKENGO_API_KEY", "valueFrom": {"secretKeyRef": {"name": "backend", "key": "token", "optional": false}}}
                ],
                "ports": [{"name": "admin", "containerPort": 9090, "protocol": "TCP"}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 9090}, "periodSeconds": 10, "failureThreshold": 3},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9090}, "periodSeconds": 5, "failureThreshold": 3},
                "resources": {
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                    "limits": {"memory": "512Mi"}
                },
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": true,
                    "runAsNonRoot": true
                },
                "volumeMounts": [
                    {"name": "keys", "mountPath": "/etc/tokengo/keys", "readOnly": true},
                    {"name": "data", "mountPath": "/var/lib/tokengo"}
                ]
            })
        );
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.len(), 2);
        let keys = &volumes[0]["secret"];
        assert_eq!(keys["secretName"], "llm-exit-keys");
        assert_eq!(keys["defaultMode"], 0o440);
        assert_eq!(keys["optional"], true);
        let items = keys["items"].as_array().unwrap();
        assert_eq!(items.len(), 2 * 20, "two files for every possible ordinal");
        assert_eq!(
            items[..4],
            [
                json!({"key": "0.exit_identity.key", "path": "llm-exit-0/exit_identity.key"}),
                json!({"key": "0.ohttp_keys.json", "path": "llm-exit-0/ohttp_keys.json"}),
                json!({"key": "1.exit_identity.key", "path": "llm-exit-1/exit_identity.key"}),
                json!({"key": "1.ohttp_keys.json", "path": "llm-exit-1/ohttp_keys.json"}),
            ]
        );
        assert_eq!(
            items[39],
            json!({"key": "19.ohttp_keys.json", "path": "llm-exit-19/ohttp_keys.json"})
        );
        assert_eq!(
            volumes[1],
            json!({"name": "data", "emptyDir": {"sizeLimit": "16Mi"}})
        );
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 45);
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        // The API key never appears as a literal anywhere in the pod spec.
        assert!(!value.to_string().contains("Bearer"));
    }

    /// Scaling changes `replicas` and nothing else: no running pod rolls.
    #[test]
    fn scaling_leaves_the_pod_template_alone() {
        let relays = relays();
        let one = stateful_set(
            &basic(),
            &Settings::default(),
            RelaySource::Addresses(&relays),
            "hash",
        );
        let mut three = basic();
        three.spec.replicas = 3;
        let three = stateful_set(
            &three,
            &Settings::default(),
            RelaySource::Addresses(&relays),
            "hash",
        );
        let (one, three) = (one.spec.unwrap(), three.spec.unwrap());
        assert_eq!((one.replicas, three.replicas), (Some(1), Some(3)));
        assert_eq!(one.template, three.template);
    }

    #[test]
    fn dht_discovery_runs_one_container_without_a_relay() {
        let exit = exit(json!({
            "backend": {
                "url": "http://ollama.models.svc:11434",
                "apiKeySecret": {"name": "backend", "key": "token"}
            },
            "relay": {"dht": {
                "bootstrap": ["/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB", "/ip4/10.0.0.2/udp/4001/quic-v1/p2p/12D3KooWC"],
                "protocol": "/mynet/kad/1.0.0",
                "maxRelays": 5
            }}
        }));
        let dht = exit.spec.relay.dht.clone().unwrap();
        let set = stateful_set(&exit, &Settings::default(), RelaySource::Dht(&dht), "hash");
        let value = serde_json::to_value(&set).unwrap();
        let containers = &value["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_array().unwrap().len(), 1);
        assert_eq!(
            containers[0]["args"],
            json!([
                "exit",
                "--backend",
                "http://ollama.models.svc:11434",
                "--data-dir",
                "/var/lib/tokengo",
                "--keys-dir",
                "/etc/tokengo/keys/$(POD_NAME)"
            ])
        );
        assert_eq!(
            containers[0]["env"],
            json!([
                {"name": "TOKENGO_LOG_FORMAT", "value": "json"},
                {"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"},
                pod_name_env(),
                {"name": "TOKENGO_PUBLIC", "value": "true"},
                {"name": "TOKENGO_BOOTSTRAP", "value": "/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB,/ip4/10.0.0.2/udp/4001/quic-v1/p2p/12D3KooWC"},
                {"name": "TOKENGO_DHT_PROTOCOL", "value": "/mynet/kad/1.0.0"},
                {"name": "TOKENGO_MAX_RELAYS", "value": "5"},
                {"name": "TOKENGO_KEY_ROTATION_HOURS", "value": "0"},
                {"name": "TOKENGO_API_KEY", "valueFrom": {"secretKeyRef": {"name": "backend", "key": "token", "optional": false}}}
            ])
        );
        // The public DHT with the node's defaults: no DHT variables at all.
        let public = ExitDht::default();
        let set = stateful_set(
            &exit,
            &Settings::default(),
            RelaySource::Dht(&public),
            "hash",
        );
        let c = &set.spec.unwrap().template.spec.unwrap().containers;
        let env: Vec<&str> = c[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            env,
            [
                "TOKENGO_LOG_FORMAT",
                "TOKENGO_ADMIN_LISTEN",
                POD_NAME_ENV,
                "TOKENGO_PUBLIC",
                "TOKENGO_KEY_ROTATION_HOURS",
                "TOKENGO_API_KEY"
            ]
        );
    }

    #[test]
    fn public_and_access_tokens_reach_the_container() {
        let exit = exit(json!({
            "backend": {"url": "https://api.example.com"},
            "relay": {"addresses": RELAYS},
            "public": true,
            "accessTokensSecret": {"name": "research-tokens", "key": "tokens.txt"}
        }));
        let relays = relays();
        let set = stateful_set(
            &exit,
            &Settings::default(),
            RelaySource::Addresses(&relays),
            "hash",
        );
        let value = serde_json::to_value(&set).unwrap();
        let pod = &value["spec"]["template"]["spec"];
        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        assert_eq!(
            c["args"],
            json!([
                "exit",
                "--relay",
                RELAYS[0],
                "--relay",
                RELAYS[1],
                "--backend",
                "https://api.example.com",
                "--data-dir",
                "/var/lib/tokengo",
                "--keys-dir",
                "/etc/tokengo/keys/$(POD_NAME)",
                "--access-token-file",
                "/etc/tokengo/access/tokens"
            ])
        );
        assert_eq!(
            c["env"],
            json!([
                {"name": "TOKENGO_LOG_FORMAT", "value": "json"},
                {"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"},
                pod_name_env(),
                {"name": "TOKENGO_PUBLIC", "value": "true"},
                {"name": "TOKENGO_KEY_ROTATION_HOURS", "value": "0"}
            ])
        );
        assert_eq!(
            c["volumeMounts"],
            json!([
                {"name": "keys", "mountPath": "/etc/tokengo/keys", "readOnly": true},
                {"name": "data", "mountPath": "/var/lib/tokengo"},
                {"name": "access-tokens", "mountPath": "/etc/tokengo/access", "readOnly": true}
            ])
        );
        assert_eq!(
            pod["volumes"][2],
            json!({"name": "access-tokens", "secret": {
                "secretName": "research-tokens",
                "defaultMode": 0o440,
                "items": [{"key": "tokens.txt", "path": "tokens"}],
                "optional": false
            }})
        );
        // The default: private, no token volume, and the spec stays as it was written.
        let private = basic();
        assert!(!private.spec.public);
        assert!(
            !serde_json::to_value(&private.spec)
                .unwrap()
                .as_object()
                .unwrap()
                .contains_key("public")
        );
        let set = stateful_set(
            &private,
            &Settings::default(),
            RelaySource::Addresses(&relays),
            "hash",
        );
        let value = serde_json::to_value(&set).unwrap();
        assert!(!value.to_string().contains("TOKENGO_PUBLIC"));
        assert!(!value.to_string().contains("access-token"));
    }

    #[test]
    fn keys_secret_holds_every_ordinal_and_the_handled_rotation() {
        let mut exit = basic();
        exit.spec.replicas = 2;
        let mut keys = ExitKeySet::new();
        keys.fill(2, 1).unwrap();
        let secret = keys_secret(&exit, &keys, Some("r1"));
        assert_eq!(secret.metadata.name.as_deref(), Some("llm-exit-keys"));
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data.len(), 4);
        assert_eq!(data, &keys.encode());
        assert_eq!(
            secret.metadata.annotations.as_ref().unwrap()[ROTATION_HANDLED_ANNOTATION],
            "r1"
        );
        assert_eq!(
            secret.immutable, None,
            "rotation replaces the keyrings in place"
        );
        assert_eq!(
            secret.metadata.owner_references, None,
            "kept by default: clients pin these PeerIds"
        );
        exit.spec.retain_identity = false;
        let owned = keys_secret(&exit, &keys, None);
        assert_eq!(
            owned.metadata.owner_references.unwrap()[0].kind,
            "TokenGoExit"
        );
        assert_eq!(owned.metadata.annotations, None);
    }

    #[test]
    fn a_rewritten_secret_keeps_its_metadata_and_version() {
        let exit = basic();
        let mut keys = ExitKeySet::new();
        keys.fill(1, 1).unwrap();
        let mut current = keys_secret(&exit, &keys, Some("r1"));
        current.metadata.resource_version = Some("42".into());
        current
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert("someone/else".into(), "x".into());
        keys.fill(2, 2).unwrap();
        let owners = crate::manifest::key_secret_owners(&exit, &[], false);
        let rewritten = rewritten_keys_secret(&current, &keys, Some("r2"), owners.clone());
        assert_eq!(rewritten.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(rewritten.data.as_ref().unwrap().len(), 4);
        let annotations = rewritten.metadata.annotations.unwrap();
        assert_eq!(annotations[ROTATION_HANDLED_ANNOTATION], "r2");
        assert_eq!(annotations["someone/else"], "x");
        assert_eq!(rewritten.metadata.owner_references, Some(owners));
        assert_eq!(rewritten.metadata.labels, current.metadata.labels);
    }

    #[test]
    fn pods_are_named_by_ordinal() {
        assert_eq!(pod_name(&basic(), 0), "llm-exit-0");
        assert_eq!(pod_name(&basic(), 12), "llm-exit-12");
    }
}
