//! Desired children of a `TokenGoRelay`: its identity Secret, a Deployment whose pods all mount
//! that one identity, and a UDP Service (QUIC, plus the libp2p port when the relay announces
//! itself on the DHT); plus the addresses the status publishes and whether an announcing relay
//! has an address to announce.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::Deployment,
        core::v1::{ContainerPort, Secret, Service, ServicePort, ServiceSpec},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::ResourceExt as _;
use tokengo_proto::data_dir::RELAY_IDENTITY_FILE;

use super::{
    DATA_DIR, NodeContainer, NodeWorkload, Settings, child_meta, dht_env, digest, node_container,
    node_deployment, non_empty, plain_env, selector,
};
use crate::resource::{TokenGoRelay, relay::ServiceType};

const COMPONENT: &str = "relay";

/// Name of the Deployment and the Service.
#[must_use]
pub fn workload_name(relay: &TokenGoRelay) -> String {
    format!("{}-relay", relay.name_any())
}

/// Name of the identity Secret.
#[must_use]
pub fn identity_secret_name(relay: &TokenGoRelay) -> String {
    format!("{}-relay-identity", relay.name_any())
}

/// The identity Secret, made once, holding the key under the data-directory file name the node
/// reads ([`RELAY_IDENTITY_FILE`]): immutable, so nothing (this operator included) can replace
/// the key under a running relay.
#[must_use]
pub fn identity_secret(relay: &TokenGoRelay, identity: &[u8]) -> Secret {
    Secret {
        metadata: child_meta(relay, COMPONENT, identity_secret_name(relay)),
        type_: Some("Opaque".to_owned()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            RELAY_IDENTITY_FILE.to_owned(),
            ByteString(identity.to_vec()),
        )])),
        ..Default::default()
    }
}

/// The relay Deployment. `peer_id` feeds the pod-template hash, so a new identity rolls pods.
#[must_use]
pub fn deployment(relay: &TokenGoRelay, settings: &Settings, peer_id: &str) -> Deployment {
    let spec = &relay.spec;
    let mut env = Vec::new();
    let mut ports = vec![udp_port("quic", spec.port)];
    if spec.dht.announce {
        // The node's DHT settings (node/src/cli.rs): the swarm's UDP port, the public IP it
        // announces (ports after the IP are ignored by the node: it announces its own), and
        // a private DHT's bootstrap peers (comma-separated) and protocol name.
        env.push(plain_env("TOKENGO_DHT_ANNOUNCE", "true".to_owned()));
        env.push(plain_env(
            "TOKENGO_DHT_LISTEN",
            format!("0.0.0.0:{}", spec.dht_port),
        ));
        if let Some(external) = external_multiaddr(relay) {
            env.push(plain_env("TOKENGO_EXTERNAL_ADDRS", external));
        }
        env.extend(dht_env(&spec.dht.bootstrap, spec.dht.protocol.as_deref()));
        ports.push(udp_port("dht", spec.dht_port));
    }
    let container = node_container(
        settings,
        NodeContainer {
            name: "relay".to_owned(),
            image: spec.image.as_ref(),
            args: vec![
                "relay".to_owned(),
                "--listen".to_owned(),
                format!("0.0.0.0:{}", spec.port),
                "--data-dir".to_owned(),
                DATA_DIR.to_owned(),
            ],
            env,
            ports,
            admin_port_name: "admin".to_owned(),
            admin_port: spec.admin_port,
            resources: spec.resources.clone(),
        },
    );
    node_deployment(NodeWorkload {
        extra_volumes: Vec::new(),
        owner: relay,
        component: COMPONENT,
        name: workload_name(relay),
        replicas: spec.replicas,
        scheduling: &spec.scheduling,
        keys_hash: digest([peer_id.as_bytes()]),
        containers: vec![container],
        keys_secret: identity_secret_name(relay),
        key_files: &[RELAY_IDENTITY_FILE],
    })
}

fn udp_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("UDP".to_owned()),
        ..Default::default()
    }
}

/// The relay Service: the UDP port `quic`, and the UDP port `dht` when the relay announces
/// itself (its node port, if any, is left to Kubernetes).
#[must_use]
pub fn service(relay: &TokenGoRelay) -> Service {
    let spec = &relay.spec;
    let mut metadata = child_meta(relay, COMPONENT, workload_name(relay));
    metadata.annotations = non_empty(spec.service.annotations.clone());
    let node_port = match spec.service.type_ {
        ServiceType::ClusterIP => None,
        ServiceType::NodePort | ServiceType::LoadBalancer => spec.service.node_port,
    };
    let mut ports = vec![ServicePort {
        name: Some("quic".to_owned()),
        protocol: Some("UDP".to_owned()),
        port: spec.port,
        target_port: Some(IntOrString::String("quic".to_owned())),
        node_port,
        ..Default::default()
    }];
    if spec.dht.announce {
        ports.push(ServicePort {
            name: Some("dht".to_owned()),
            protocol: Some("UDP".to_owned()),
            port: spec.dht_port,
            target_port: Some(IntOrString::String("dht".to_owned())),
            ..Default::default()
        });
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(spec.service.type_.as_str().to_owned()),
            selector: Some(selector(COMPONENT, &relay.name_any())),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The multiaddrs to publish: the in-cluster DNS name first, then the external address.
#[must_use]
pub fn addresses(relay: &TokenGoRelay, settings: &Settings, peer_id: &str) -> Vec<String> {
    let spec = &relay.spec;
    let namespace = relay.namespace().unwrap_or_else(|| "default".to_owned());
    let mut out = vec![format!(
        "/dns4/{}.{namespace}.svc.{}/udp/{}/quic-v1/p2p/{peer_id}",
        workload_name(relay),
        settings.cluster_domain,
        spec.port
    )];
    if let Some(external) = &spec.external_address {
        let port = match (spec.service.type_, spec.service.node_port) {
            (ServiceType::NodePort, Some(node_port)) => node_port,
            _ => spec.port,
        };
        let host = match external.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => format!("/ip4/{ip}"),
            Ok(IpAddr::V6(ip)) => format!("/ip6/{ip}"),
            Err(_) => format!("/dns/{external}"),
        };
        out.push(format!("{host}/udp/{port}/quic-v1/p2p/{peer_id}"));
    }
    out
}

/// The external address the node announces on the DHT: `externalAddress` as
/// `/ip4|ip6/IP/udp/DHTPORT/quic-v1`. `None` when it is unset or a host name (the node takes
/// IPs only: `external_addrs` in node/src/config.rs).
#[must_use]
pub fn external_multiaddr(relay: &TokenGoRelay) -> Option<String> {
    let spec = &relay.spec;
    let ip = spec.external_address.as_deref()?.parse::<IpAddr>().ok()?;
    let host = match ip {
        IpAddr::V4(ip) => format!("/ip4/{ip}"),
        IpAddr::V6(ip) => format!("/ip6/{ip}"),
    };
    Some(format!("{host}/udp/{}/quic-v1", spec.dht_port))
}

/// Why a relay asked to announce itself cannot be found on the DHT: it has no IP address to
/// announce. `None` when it does not announce or has one.
#[must_use]
pub fn announce_problem(relay: &TokenGoRelay) -> Option<String> {
    let spec = &relay.spec;
    if !spec.dht.announce || external_multiaddr(relay).is_some() {
        return None;
    }
    Some(match &spec.external_address {
        None => "dht.announce is set but externalAddress is not: the relay has no address to \
                 announce, so nobody can find it on the DHT; set externalAddress to its public IP"
            .to_owned(),
        Some(host) => format!(
            "dht.announce is set but externalAddress {host} is a host name: the node announces \
             IP addresses only, so nobody can find it on the DHT; set externalAddress to its IP"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::TokenGoRelaySpec;
    use serde_json::json;

    fn relay(spec: serde_json::Value) -> TokenGoRelay {
        let spec: TokenGoRelaySpec = serde_json::from_value(spec).unwrap();
        let mut relay = TokenGoRelay::new("edge", spec);
        relay.metadata.namespace = Some("net".into());
        relay.metadata.uid = Some("uid-1".into());
        relay
    }

    const PEER: &str = "12D3KooWPeer";

    #[test]
    fn deployment_runs_the_relay_locked_down_with_its_identity() {
        let relay = relay(json!({}));
        let deployment =
            serde_json::to_value(deployment(&relay, &Settings::default(), PEER)).unwrap();
        let expected = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "edge-relay",
                "namespace": "net",
                "labels": {
                    "app.kubernetes.io/component": "relay",
                    "app.kubernetes.io/instance": "edge",
                    "app.kubernetes.io/managed-by": "tokengo-operator",
                    "app.kubernetes.io/name": "tokengo-relay"
                },
                "ownerReferences": [{
                    "apiVersion": "tokengo.io/v1alpha1",
                    "kind": "TokenGoRelay",
                    "name": "edge",
                    "uid": "uid-1",
                    "controller": true
                }]
            },
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {
                    "app.kubernetes.io/instance": "edge",
                    "app.kubernetes.io/name": "tokengo-relay"
                }},
                "template": {
                    "metadata": {
                        "annotations": {"tokengo.io/keys-hash": digest([PEER.as_bytes()])},
                        "labels": {
                            "app.kubernetes.io/component": "relay",
                            "app.kubernetes.io/instance": "edge",
                            "app.kubernetes.io/managed-by": "tokengo-operator",
                            "app.kubernetes.io/name": "tokengo-relay"
                        }
                    },
                    "spec": {
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "securityContext": {
                            "fsGroup": 65532,
                            "runAsGroup": 65532,
                            "runAsNonRoot": true,
                            "runAsUser": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}
                        },
                        "containers": [{
                            "name": "relay",
                            "image": "tokengo/node:latest",
                            "args": ["relay", "--listen", "0.0.0.0:4433", "--data-dir", "/var/lib/tokengo"],
                            "env": [
                                {"name": "TOKENGO_LOG_FORMAT", "value": "json"},
                                {"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"}
                            ],
                            "ports": [
                                {"name": "quic", "containerPort": 4433, "protocol": "UDP"},
                                {"name": "admin", "containerPort": 9090, "protocol": "TCP"}
                            ],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 9090}, "periodSeconds": 10, "failureThreshold": 3},
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": 9090}, "periodSeconds": 5, "failureThreshold": 3},
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": true,
                                "runAsNonRoot": true
                            },
                            "volumeMounts": [{"name": "keys", "mountPath": "/var/lib/tokengo", "readOnly": true}]
                        }],
                        "volumes": [{
                            "name": "keys",
                            "secret": {
                                "secretName": "edge-relay-identity",
                                "defaultMode": 0o440,
                                "items": [{"key": RELAY_IDENTITY_FILE, "path": RELAY_IDENTITY_FILE}]
                            }
                        }]
                    }
                }
            }
        });
        assert_eq!(
            deployment,
            expected,
            "{}",
            serde_json::to_string_pretty(&deployment).unwrap()
        );
    }

    #[test]
    fn deployment_carries_image_replicas_scheduling_and_dht() {
        let relay = relay(json!({
            "replicas": 3,
            "image": "registry.example/tokengo:1.2",
            "port": 5000,
            "adminPort": 9191,
            "dht": {"announce": true, "bootstrap": ["/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB"]},
            "resources": {"limits": {"memory": "128Mi"}},
            "scheduling": {
                "nodeSelector": {"pool": "edge"},
                "tolerations": [{"key": "edge", "operator": "Exists"}]
            }
        }));
        let d = deployment(&relay, &Settings::default(), PEER);
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["pool"], "edge");
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("edge"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example/tokengo:1.2"));
        assert_eq!(c.args.as_ref().unwrap()[2], "0.0.0.0:5000");
        let env: BTreeMap<_, _> = c
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap()))
            .collect();
        assert_eq!(env["TOKENGO_ADMIN_LISTEN"], "0.0.0.0:9191");
        assert_eq!(env["TOKENGO_DHT_ANNOUNCE"], "true");
        assert_eq!(
            env["TOKENGO_BOOTSTRAP"],
            "/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB"
        );
        assert!(c.resources.as_ref().unwrap().limits.is_some());
    }

    #[test]
    fn an_announcing_relay_listens_on_the_dht_port_and_announces_its_ip() {
        let relay = relay(json!({
            "externalAddress": "203.0.113.7",
            "dhtPort": 4101,
            "service": {"type": "LoadBalancer"},
            "dht": {
                "announce": true,
                "bootstrap": ["/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB", "/dns4/b.example/udp/4001/quic-v1/p2p/12D3KooWC"],
                "protocol": "/mynet/kad/1.0.0"
            }
        }));
        let d = serde_json::to_value(deployment(&relay, &Settings::default(), PEER)).unwrap();
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"],
            json!([{
                "name": "relay",
                "image": "tokengo/node:latest",
                "args": ["relay", "--listen", "0.0.0.0:4433", "--data-dir", "/var/lib/tokengo"],
                "env": [
                    {"name": "TOKENGO_LOG_FORMAT", "value": "json"},
                    {"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"},
                    {"name": "TOKENGO_DHT_ANNOUNCE", "value": "true"},
                    {"name": "TOKENGO_DHT_LISTEN", "value": "0.0.0.0:4101"},
                    {"name": "TOKENGO_EXTERNAL_ADDRS", "value": "/ip4/203.0.113.7/udp/4101/quic-v1"},
                    {"name": "TOKENGO_BOOTSTRAP", "value": "/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB,/dns4/b.example/udp/4001/quic-v1/p2p/12D3KooWC"},
                    {"name": "TOKENGO_DHT_PROTOCOL", "value": "/mynet/kad/1.0.0"}
                ],
                "ports": [
                    {"name": "quic", "containerPort": 4433, "protocol": "UDP"},
                    {"name": "dht", "containerPort": 4101, "protocol": "UDP"},
                    {"name": "admin", "containerPort": 9090, "protocol": "TCP"}
                ],
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
        let service = serde_json::to_value(service(&relay)).unwrap();
        assert_eq!(
            service["spec"],
            json!({
                "type": "LoadBalancer",
                "selector": {"app.kubernetes.io/instance": "edge", "app.kubernetes.io/name": "tokengo-relay"},
                "ports": [
                    {"name": "quic", "protocol": "UDP", "port": 4433, "targetPort": "quic"},
                    {"name": "dht", "protocol": "UDP", "port": 4101, "targetPort": "dht"}
                ]
            })
        );
        assert_eq!(announce_problem(&relay), None);
        // The published relay addresses stay QUIC addresses.
        assert_eq!(
            addresses(&relay, &Settings::default(), PEER)[1],
            format!("/ip4/203.0.113.7/udp/4433/quic-v1/p2p/{PEER}")
        );
    }

    #[test]
    fn the_dht_port_is_default_4001_and_unused_without_announce() {
        let quiet = relay(
            json!({"externalAddress": "203.0.113.7", "dht": {"bootstrap": ["/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB"]}}),
        );
        assert_eq!(quiet.spec.dht_port, 4001);
        let c = container(&quiet);
        assert_eq!(
            env_names(&c),
            ["TOKENGO_LOG_FORMAT", "TOKENGO_ADMIN_LISTEN"]
        );
        assert_eq!(c.ports.as_ref().unwrap().len(), 2);
        assert_eq!(service_ports(&quiet).len(), 1);
        assert_eq!(announce_problem(&quiet), None);

        let v6 = relay(json!({"externalAddress": "2001:db8::1", "dht": {"announce": true}}));
        assert_eq!(
            external_multiaddr(&v6).as_deref(),
            Some("/ip6/2001:db8::1/udp/4001/quic-v1")
        );
        assert_eq!(service_ports(&v6)[1].port, 4001);
    }

    #[test]
    fn an_announcing_relay_without_an_ip_is_reported() {
        let missing = relay(json!({"dht": {"announce": true}}));
        let problem = announce_problem(&missing).unwrap();
        assert!(problem.contains("externalAddress is not"), "{problem}");
        let host =
            relay(json!({"externalAddress": "relay.example.org", "dht": {"announce": true}}));
        let problem = announce_problem(&host).unwrap();
        assert!(
            problem.contains("relay.example.org is a host name"),
            "{problem}"
        );
        for relay in [&missing, &host] {
            // It still runs and listens for libp2p, but announces no address of its own.
            let c = container(relay);
            assert_eq!(
                env_names(&c),
                [
                    "TOKENGO_LOG_FORMAT",
                    "TOKENGO_ADMIN_LISTEN",
                    "TOKENGO_DHT_ANNOUNCE",
                    "TOKENGO_DHT_LISTEN"
                ]
            );
            assert_eq!(external_multiaddr(relay), None);
        }
    }

    #[test]
    fn a_new_identity_changes_the_pod_template() {
        let relay = relay(json!({}));
        let a = deployment(&relay, &Settings::default(), "12D3KooWA");
        let b = deployment(&relay, &Settings::default(), "12D3KooWB");
        assert_ne!(
            a.spec.unwrap().template.metadata.unwrap().annotations,
            b.spec.unwrap().template.metadata.unwrap().annotations
        );
    }

    #[test]
    fn service_is_udp_with_type_annotations_and_node_port() {
        let relay = relay(json!({
            "service": {"type": "NodePort", "nodePort": 30433, "annotations": {"a": "b"}}
        }));
        let service = serde_json::to_value(service(&relay)).unwrap();
        assert_eq!(
            service,
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "edge-relay",
                    "namespace": "net",
                    "annotations": {"a": "b"},
                    "labels": {
                        "app.kubernetes.io/component": "relay",
                        "app.kubernetes.io/instance": "edge",
                        "app.kubernetes.io/managed-by": "tokengo-operator",
                        "app.kubernetes.io/name": "tokengo-relay"
                    },
                    "ownerReferences": [{
                        "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "name": "edge",
                        "uid": "uid-1", "controller": true
                    }]
                },
                "spec": {
                    "type": "NodePort",
                    "selector": {"app.kubernetes.io/instance": "edge", "app.kubernetes.io/name": "tokengo-relay"},
                    "ports": [{"name": "quic", "protocol": "UDP", "port": 4433, "targetPort": "quic", "nodePort": 30433}]
                }
            })
        );
        // A ClusterIP Service never carries a node port.
        let internal = relay_with_cluster_ip();
        let ports = service_ports(&internal);
        assert_eq!(ports[0].node_port, None);
    }

    /// The relay container of `relay`'s Deployment.
    fn container(relay: &TokenGoRelay) -> k8s_openapi::api::core::v1::Container {
        let pod = deployment(relay, &Settings::default(), PEER)
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        pod.containers.into_iter().next().unwrap()
    }

    fn env_names(container: &k8s_openapi::api::core::v1::Container) -> Vec<String> {
        container
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .collect()
    }

    fn relay_with_cluster_ip() -> TokenGoRelay {
        relay(json!({"service": {"type": "ClusterIP", "nodePort": 30433}}))
    }

    fn service_ports(relay: &TokenGoRelay) -> Vec<ServicePort> {
        service(relay).spec.unwrap().ports.unwrap()
    }

    #[test]
    fn identity_secret_is_immutable_and_owned() {
        let relay = relay(json!({}));
        let secret = identity_secret(&relay, b"key-bytes");
        assert_eq!(secret.metadata.name.as_deref(), Some("edge-relay-identity"));
        assert_eq!(secret.immutable, Some(true));
        let data = secret.data.unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data[RELAY_IDENTITY_FILE].0, b"key-bytes");
        let owner = &secret.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("TokenGoRelay", Some(true))
        );
    }

    #[test]
    fn addresses_name_the_service_and_the_external_address() {
        let settings = Settings::default();
        assert_eq!(
            addresses(&relay(json!({})), &settings, PEER),
            vec![format!(
                "/dns4/edge-relay.net.svc.cluster.local/udp/4433/quic-v1/p2p/{PEER}"
            )]
        );
        let external = relay(json!({
            "externalAddress": "203.0.113.7",
            "service": {"type": "NodePort", "nodePort": 30433}
        }));
        assert_eq!(
            addresses(&external, &settings, PEER)[1],
            format!("/ip4/203.0.113.7/udp/30433/quic-v1/p2p/{PEER}")
        );
        let dns = relay(
            json!({"externalAddress": "relay.example.org", "service": {"type": "LoadBalancer"}}),
        );
        assert_eq!(
            addresses(&dns, &settings, PEER)[1],
            format!("/dns/relay.example.org/udp/4433/quic-v1/p2p/{PEER}")
        );
        let v6 = relay(json!({"externalAddress": "2001:db8::1"}));
        assert!(addresses(&v6, &settings, PEER)[1].starts_with("/ip6/2001:db8::1/udp/4433/"));
    }
}
