//! Desired children of a `TokenGoExit`: its key Secret (identity and OHTTP keyring) and a
//! Deployment whose pods run one `tokengo exit` container: registered with every relay (one
//! `--relay` each; the node keeps a tunnel to each), or with DHT discovery finding its relays
//! itself.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::Deployment,
        core::v1::{
            Container, EnvVar, EnvVarSource, KeyToPath, Secret, SecretKeySelector,
            SecretVolumeSource, Volume, VolumeMount,
        },
    },
};
use kube::ResourceExt as _;
use tokengo_proto::data_dir::{EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE};

use super::{
    DATA_DIR, NodeContainer, NodeWorkload, Settings, child_meta, dht_env, digest, node_container,
    node_deployment, plain_env,
};
use crate::{
    keys::PublicKey,
    resource::{TokenGoExit, exit::ExitDht},
};

/// Annotation on the key Secret: the last `tokengo.io/rotate` value of the exit that was acted
/// on, so a rotation request is carried out once.
pub const ROTATION_HANDLED_ANNOTATION: &str = "tokengo.io/rotation-handled";
/// Annotation a user sets (to any new value) on a `TokenGoExit` to rotate its key now.
pub const ROTATE_ANNOTATION: &str = "tokengo.io/rotate";
const COMPONENT: &str = "exit";
/// Where the access-token Secret is mounted (a directory mount, not `subPath`, so an updated
/// Secret reaches the running exit, which re-reads the file when it changes).
pub const ACCESS_TOKENS_DIR: &str = "/etc/tokengo/access";
/// The token file in [`ACCESS_TOKENS_DIR`].
const ACCESS_TOKENS_FILE: &str = "tokens";
const ACCESS_TOKENS_VOLUME: &str = "access-tokens";

/// Name of the Deployment.
#[must_use]
pub fn workload_name(exit: &TokenGoExit) -> String {
    format!("{}-exit", exit.name_any())
}

/// Name of the key Secret.
#[must_use]
pub fn keys_secret_name(exit: &TokenGoExit) -> String {
    format!("{}-exit-keys", exit.name_any())
}

/// The key Secret: identity and keyring under the data-directory file names the node reads
/// ([`EXIT_IDENTITY_FILE`], [`EXIT_KEYRING_FILE`]). `rotation_handled` is the
/// rotation request already carried out (if any).
#[must_use]
pub fn keys_secret(
    exit: &TokenGoExit,
    identity: &[u8],
    keyring: &[u8],
    rotation_handled: Option<&str>,
) -> Secret {
    let mut metadata = child_meta(exit, COMPONENT, keys_secret_name(exit));
    metadata.annotations = rotation_handled
        .map(|v| BTreeMap::from([(ROTATION_HANDLED_ANNOTATION.to_owned(), v.to_owned())]));
    Secret {
        metadata,
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (EXIT_IDENTITY_FILE.to_owned(), ByteString(identity.to_vec())),
            (EXIT_KEYRING_FILE.to_owned(), ByteString(keyring.to_vec())),
        ])),
        ..Default::default()
    }
}

/// Digest of the public key material: the pod-template annotation that rolls pods on rotation.
#[must_use]
pub fn keys_hash(peer_id: &str, keys: &[PublicKey]) -> String {
    let encoded: Vec<Vec<u8>> = keys.iter().map(|k| k.config.encode()).collect();
    digest(std::iter::once(peer_id.as_bytes()).chain(encoded.iter().map(Vec::as_slice)))
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

/// The exit Deployment: one container, registered with every relay address or discovering
/// relays on the DHT.
#[must_use]
pub fn deployment(
    exit: &TokenGoExit,
    settings: &Settings,
    relays: RelaySource<'_>,
    keys_hash: &str,
) -> Deployment {
    let spec = &exit.spec;
    // Discovering relays is what a public exit does: the node refuses it otherwise.
    let public = spec.public || matches!(relays, RelaySource::Dht(_));
    let public_env = || {
        if public {
            vec![plain_env("TOKENGO_PUBLIC", "true".to_owned())]
        } else {
            Vec::new()
        }
    };
    let containers = match relays {
        RelaySource::Addresses(addresses) => {
            vec![container(exit, settings, addresses, public_env())]
        }
        RelaySource::Dht(dht) => {
            let mut env = public_env();
            env.extend(dht_env(&dht.bootstrap, dht.protocol.as_deref()));
            if let Some(max) = dht.max_relays {
                env.push(plain_env("TOKENGO_MAX_RELAYS", max.to_string()));
            }
            vec![container(exit, settings, &[], env)]
        }
    };
    node_deployment(NodeWorkload {
        owner: exit,
        component: COMPONENT,
        name: workload_name(exit),
        replicas: spec.replicas,
        scheduling: &spec.scheduling,
        keys_hash: keys_hash.to_owned(),
        containers,
        keys_secret: keys_secret_name(exit),
        key_files: &[EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE],
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
    })
}

/// The exit container: registers with each of `relays`, or discovers relays when there are
/// none; `extra_env` follows the log and admin settings.
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
    ]);
    for header in &spec.backend.headers {
        args.push("--header".to_owned());
        args.push(format!("{}: {}", header.name, header.value));
    }
    if spec.access_tokens_secret.is_some() {
        args.push("--access-token-file".to_owned());
        args.push(format!("{ACCESS_TOKENS_DIR}/{ACCESS_TOKENS_FILE}"));
    }
    let mut env = extra_env;
    // The operator rotates the keys (in the Secret, rolling the pods): every replica serves
    // one identity, and pods rotating on their own would give it different keys, which
    // clients refuse as a key conflict; the mounted key files are read-only anyway.
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
    use crate::{keys::Keyring, resource::TokenGoExitSpec};
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
        "/dns4/edge-relay.ai.svc.cluster.local/udp/4433/quic-v1/p2p/12D3KooWA",
        "/ip4/203.0.113.7/udp/4433/quic-v1/p2p/12D3KooWB",
    ];

    #[test]
    fn one_container_for_every_relay_with_backend_headers_and_secret_api_key() {
        let exit = basic();
        let relays: Vec<String> = RELAYS.iter().map(|s| (*s).to_owned()).collect();
        let d = deployment(
            &exit,
            &Settings::default(),
            RelaySource::Addresses(&relays),
            "hash",
        );
        let value = serde_json::to_value(&d).unwrap();
        let pod = &value["spec"]["template"];
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
                    "--data-dir", "/var/lib/tokengo", "--header", "X-Team: ml"
                ],
                "env": [
                    {"name": "TOKENGO_LOG_FORMAT", "value": "json"},
                    {"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"},
                    {"name": "TOKENGO_KEY_ROTATION_HOURS", "value": "0"},
                    {"name": "TOKENGO_API_KEY", "valueFrom": {"secretKeyRef": {"name": "backend", "key": "token", "optional": false}}}
                ],
                "ports": [{"name": "admin", "containerPort": 9090, "protocol": "TCP"}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 9090}, "periodSeconds": 10, "failureThreshold": 3},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9090}, "periodSeconds": 5, "failureThreshold": 3},
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": true,
                    "runAsNonRoot": true
                },
                "volumeMounts": [{"name": "keys", "mountPath": "/var/lib/tokengo", "readOnly": true}]
            })
        );
        assert_eq!(
            pod["spec"]["volumes"],
            json!([{"name": "keys", "secret": {
                "secretName": "llm-exit-keys",
                "defaultMode": 0o440,
                "items": [
                    {"key": EXIT_IDENTITY_FILE, "path": EXIT_IDENTITY_FILE},
                    {"key": EXIT_KEYRING_FILE, "path": EXIT_KEYRING_FILE}
                ]
            }}])
        );
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(value["metadata"]["name"], "llm-exit");
        assert_eq!(
            value["metadata"]["ownerReferences"][0]["kind"],
            "TokenGoExit"
        );
        // The API key never appears as a literal anywhere in the pod spec.
        assert!(!value.to_string().contains("Bearer"));
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
        let d = deployment(&exit, &Settings::default(), RelaySource::Dht(&dht), "hash");
        let value = serde_json::to_value(&d).unwrap();
        assert_eq!(
            value["spec"]["template"]["spec"]["containers"],
            json!([{
                "name": "exit",
                "image": "tokengo/node:latest",
                "args": ["exit", "--backend", "http://ollama.models.svc:11434", "--data-dir", "/var/lib/tokengo"],
                "env": [
                    {"name": "TOKENGO_LOG_FORMAT", "value": "json"},
                    {"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"},
                    {"name": "TOKENGO_PUBLIC", "value": "true"},
                    {"name": "TOKENGO_BOOTSTRAP", "value": "/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB,/ip4/10.0.0.2/udp/4001/quic-v1/p2p/12D3KooWC"},
                    {"name": "TOKENGO_DHT_PROTOCOL", "value": "/mynet/kad/1.0.0"},
                    {"name": "TOKENGO_MAX_RELAYS", "value": "5"},
                    {"name": "TOKENGO_KEY_ROTATION_HOURS", "value": "0"},
                    {"name": "TOKENGO_API_KEY", "valueFrom": {"secretKeyRef": {"name": "backend", "key": "token", "optional": false}}}
                ],
                "ports": [{"name": "admin", "containerPort": 9090, "protocol": "TCP"}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 9090}, "periodSeconds": 10, "failureThreshold": 3},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9090}, "periodSeconds": 5, "failureThreshold": 3},
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": true,
                    "runAsNonRoot": true
                },
                "volumeMounts": [{"name": "keys", "mountPath": "/var/lib/tokengo", "readOnly": true}]
            }])
        );
        // The public DHT with the node's defaults: no DHT variables at all.
        let public = ExitDht::default();
        let d = deployment(
            &exit,
            &Settings::default(),
            RelaySource::Dht(&public),
            "hash",
        );
        let c = &d.spec.unwrap().template.spec.unwrap().containers;
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
                "TOKENGO_PUBLIC",
                "TOKENGO_KEY_ROTATION_HOURS",
                "TOKENGO_API_KEY"
            ]
        );
    }

    #[test]
    fn public_and_access_tokens_reach_every_container() {
        let exit = exit(json!({
            "backend": {"url": "https://api.example.com"},
            "relay": {"addresses": RELAYS},
            "public": true,
            "accessTokensSecret": {"name": "research-tokens", "key": "tokens.txt"}
        }));
        let relays: Vec<String> = RELAYS.iter().map(|s| (*s).to_owned()).collect();
        let d = deployment(
            &exit,
            &Settings::default(),
            RelaySource::Addresses(&relays),
            "hash",
        );
        let value = serde_json::to_value(&d).unwrap();
        let pod = &value["spec"]["template"]["spec"];
        let containers = pod["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        for c in containers {
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
                    "--access-token-file",
                    "/etc/tokengo/access/tokens"
                ])
            );
            assert_eq!(
                c["env"],
                json!([
                    {"name": "TOKENGO_LOG_FORMAT", "value": "json"},
                    {"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"},
                    {"name": "TOKENGO_PUBLIC", "value": "true"},
                    {"name": "TOKENGO_KEY_ROTATION_HOURS", "value": "0"}
                ])
            );
            assert_eq!(
                c["volumeMounts"],
                json!([
                    {"name": "keys", "mountPath": "/var/lib/tokengo", "readOnly": true},
                    {"name": "access-tokens", "mountPath": "/etc/tokengo/access", "readOnly": true}
                ])
            );
        }
        assert_eq!(
            pod["volumes"][1],
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
        let d = deployment(
            &private,
            &Settings::default(),
            RelaySource::Addresses(&relays),
            "hash",
        );
        let value = serde_json::to_value(&d).unwrap();
        assert!(!value.to_string().contains("TOKENGO_PUBLIC"));
        assert!(!value.to_string().contains("access-token"));
    }

    #[test]
    fn keys_secret_holds_both_files_and_the_handled_rotation() {
        let exit = basic();
        let secret = keys_secret(&exit, b"id", b"ring", Some("r1"));
        assert_eq!(secret.metadata.name.as_deref(), Some("llm-exit-keys"));
        let data = secret.data.unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data[EXIT_IDENTITY_FILE].0, b"id");
        assert_eq!(data[EXIT_KEYRING_FILE].0, b"ring");
        assert_eq!(
            secret.metadata.annotations.unwrap()[ROTATION_HANDLED_ANNOTATION],
            "r1"
        );
        assert_eq!(
            secret.immutable, None,
            "rotation replaces the keyring in place"
        );
    }

    #[test]
    fn rotation_changes_the_keys_hash() {
        let mut ring = Keyring::generate(1, 1).unwrap();
        let before = keys_hash("12D3KooWX", &ring.public_keys());
        assert_eq!(before, keys_hash("12D3KooWX", &ring.public_keys()));
        ring.rotate(2).unwrap();
        assert_ne!(before, keys_hash("12D3KooWX", &ring.public_keys()));
    }
}
