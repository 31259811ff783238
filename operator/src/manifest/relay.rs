//! Desired children of a `TokenGoRelay`: its identity Secret, a Deployment whose pods all mount
//! that one identity, a UDP Service (QUIC, plus the libp2p port when the relay announces itself
//! on the DHT), a headless Service naming every pod (exits register with each), and a
//! PodDisruptionBudget when there is more than one pod; plus the addresses the status
//! publishes and whether an announcing relay has an address to announce, from the facts
//! Kubernetes gave the Service ([`Exposure`]).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{
            ContainerPort, KeyToPath, Secret, SecretVolumeSource, Service, ServicePort, ServiceSpec,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::ResourceExt as _;
use tokengo_proto::data_dir::RELAY_IDENTITY_FILE;

use super::{
    DATA_DIR, KEYS_DIR, NodeContainer, NodePod, Settings, child_meta, dht_env, identity_hash,
    key_secret_meta, node_container, node_pod_template, non_empty, plain_env, selector,
};
use crate::resource::{TokenGoRelay, relay::ServiceType, shared::ReadyReason};

const COMPONENT: &str = "relay";
/// The node ports Kubernetes allocates from by default.
const NODE_PORTS: std::ops::RangeInclusive<i32> = 30000..=32767;

/// Name of the Deployment, the Service and the PodDisruptionBudget.
#[must_use]
pub fn workload_name(relay: &TokenGoRelay) -> String {
    format!("{}-relay", relay.name_any())
}

/// Name of the headless Service whose DNS name resolves to every relay pod.
#[must_use]
pub fn pods_service_name(relay: &TokenGoRelay) -> String {
    format!("{}-relay-pods", relay.name_any())
}

/// Name of the identity Secret.
#[must_use]
pub fn identity_secret_name(relay: &TokenGoRelay) -> String {
    format!("{}-relay-identity", relay.name_any())
}

/// The identity Secret, made once, holding the key under the data-directory file name the node
/// reads ([`RELAY_IDENTITY_FILE`]): immutable, so nothing (this operator included) can replace
/// the key under a running relay. Owned by the relay only when it does not retain its
/// identity.
#[must_use]
pub fn identity_secret(relay: &TokenGoRelay, identity: &[u8]) -> Secret {
    Secret {
        metadata: key_secret_meta(
            relay,
            COMPONENT,
            identity_secret_name(relay),
            relay.spec.retain_identity,
        ),
        type_: Some("Opaque".to_owned()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            RELAY_IDENTITY_FILE.to_owned(),
            ByteString(identity.to_vec()),
        )])),
        ..Default::default()
    }
}

/// What Kubernetes gave the relay's Service, read back from the applied object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exposure {
    /// The node port of `quic` (`NodePort` and `LoadBalancer` Services).
    pub quic_node_port: Option<i32>,
    /// The node port of `dht` (when the relay announces itself).
    pub dht_node_port: Option<i32>,
    /// The load balancer's address: `status.loadBalancer.ingress[0]`, its IP, else its host
    /// name.
    pub load_balancer: Option<String>,
}

/// The facts of an applied relay Service.
#[must_use]
pub fn exposure(service: &Service) -> Exposure {
    let node_port = |name: &str| {
        service
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some(name)))
            .and_then(|p| p.node_port)
    };
    let load_balancer = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|ingress| ingress.first())
        .and_then(|first| {
            first
                .ip
                .clone()
                .filter(|ip| !ip.is_empty())
                .or_else(|| first.hostname.clone().filter(|h| !h.is_empty()))
        });
    Exposure {
        quic_node_port: node_port("quic"),
        dht_node_port: node_port("dht"),
        load_balancer,
    }
}

/// The relay Deployment. `peer_id` feeds the pod-template hash, so a new identity rolls pods.
/// Its pods roll one at a time, a new one ready before an old one stops, so the relay never
/// has fewer pods than asked for. An external address that changes (a load balancer's that
/// appears) changes the template too, so the pods roll to pick it up.
#[must_use]
pub fn deployment(
    relay: &TokenGoRelay,
    settings: &Settings,
    peer_id: &str,
    exposure: &Exposure,
) -> Deployment {
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
        // Only an address whoever finds the relay can reach it at is announced.
        if announce_problem(relay, exposure).is_none()
            && let Some(external) = external_multiaddr(relay, exposure)
        {
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
                "--keys-dir".to_owned(),
                KEYS_DIR.to_owned(),
            ],
            env,
            ports,
            admin_port_name: "admin".to_owned(),
            admin_port: spec.admin_port,
            resources: spec.resources.clone(),
        },
    );
    let template = node_pod_template(
        settings,
        NodePod {
            owner: relay,
            component: COMPONENT,
            scheduling: &spec.scheduling,
            keys_hash: identity_hash(peer_id),
            containers: vec![container],
            keys: SecretVolumeSource {
                secret_name: Some(identity_secret_name(relay)),
                items: Some(vec![KeyToPath {
                    key: RELAY_IDENTITY_FILE.to_owned(),
                    path: RELAY_IDENTITY_FILE.to_owned(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            extra_volumes: Vec::new(),
        },
    );
    Deployment {
        metadata: child_meta(relay, COMPONENT, workload_name(relay)),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(COMPONENT, &relay.name_any())),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template,
            ..Default::default()
        }),
        ..Default::default()
    }
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
/// itself. For a `NodePort` Service the `dht` node port is `dhtPort` when that is a node port
/// (so an announcing relay can be reached at the port it announces), else Kubernetes'
/// choice.
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
        let dht_node_port = (spec.service.type_ == ServiceType::NodePort
            && NODE_PORTS.contains(&spec.dht_port))
        .then_some(spec.dht_port);
        ports.push(ServicePort {
            name: Some("dht".to_owned()),
            protocol: Some("UDP".to_owned()),
            port: spec.dht_port,
            target_port: Some(IntOrString::String("dht".to_owned())),
            node_port: dht_node_port,
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

/// The headless Service `<relay>-relay-pods`: its DNS name resolves to every relay pod, which
/// is what exits in the cluster are given, so each registers with every pod and a client
/// reaches its exit through whichever pod the relay Service picks. Pods are listed before
/// they are ready, so exits register with a new pod while it starts, before the relay Service
/// sends it clients.
#[must_use]
pub fn pods_service(relay: &TokenGoRelay) -> Service {
    Service {
        metadata: child_meta(relay, COMPONENT, pods_service_name(relay)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(COMPONENT, &relay.name_any())),
            ports: Some(vec![ServicePort {
                name: Some("quic".to_owned()),
                protocol: Some("UDP".to_owned()),
                port: relay.spec.port,
                target_port: Some(IntOrString::String("quic".to_owned())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The PodDisruptionBudget of a relay with more than one pod: voluntary evictions (node
/// drains) take one pod at a time. None for one pod, which a budget could only block.
#[must_use]
pub fn disruption_budget(relay: &TokenGoRelay) -> Option<PodDisruptionBudget> {
    (relay.spec.replicas > 1).then(|| PodDisruptionBudget {
        metadata: child_meta(relay, COMPONENT, workload_name(relay)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(COMPONENT, &relay.name_any())),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The host outside clients use: `externalAddress`, else a `LoadBalancer`'s own address.
fn external_host<'a>(relay: &'a TokenGoRelay, exposure: &'a Exposure) -> Option<&'a str> {
    let spec = &relay.spec;
    spec.external_address
        .as_deref()
        .or(match spec.service.type_ {
            ServiceType::LoadBalancer => exposure.load_balancer.as_deref(),
            ServiceType::ClusterIP | ServiceType::NodePort => None,
        })
}

/// A host as the start of a multiaddr.
fn host_multiaddr(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => format!("/ip4/{ip}"),
        Ok(IpAddr::V6(ip)) => format!("/ip6/{ip}"),
        Err(_) => format!("/dns/{host}"),
    }
}

/// The multiaddrs to publish: the in-cluster DNS name first, then the external address (with
/// the allocated node port for a `NodePort` Service).
#[must_use]
pub fn addresses(
    relay: &TokenGoRelay,
    settings: &Settings,
    peer_id: &str,
    exposure: &Exposure,
) -> Vec<String> {
    let spec = &relay.spec;
    let namespace = relay.namespace().unwrap_or_else(|| "default".to_owned());
    let mut out = vec![format!(
        "/dns4/{}.{namespace}.svc.{}/udp/{}/quic-v1/p2p/{peer_id}",
        workload_name(relay),
        settings.cluster_domain,
        spec.port
    )];
    if let Some(host) = external_host(relay, exposure) {
        let port = match spec.service.type_ {
            ServiceType::NodePort => exposure
                .quic_node_port
                .or(spec.service.node_port)
                .unwrap_or(spec.port),
            ServiceType::ClusterIP | ServiceType::LoadBalancer => spec.port,
        };
        out.push(format!(
            "{}/udp/{port}/quic-v1/p2p/{peer_id}",
            host_multiaddr(host)
        ));
    }
    out
}

/// The address exits in the cluster are given: the headless Service's name, which resolves to
/// every pod (the node registers with each).
#[must_use]
pub fn pods_address(relay: &TokenGoRelay, settings: &Settings, peer_id: &str) -> String {
    let namespace = relay.namespace().unwrap_or_else(|| "default".to_owned());
    format!(
        "/dns4/{}.{namespace}.svc.{}/udp/{}/quic-v1/p2p/{peer_id}",
        pods_service_name(relay),
        settings.cluster_domain,
        relay.spec.port
    )
}

/// The external address the node announces on the DHT: the external IP (`externalAddress`,
/// else a `LoadBalancer`'s IP) as `/ip4|ip6/IP/udp/DHTPORT/quic-v1`. `None` when there is none
/// or it is a host name (the node takes IPs only: `external_addrs` in node/src/config/dht.rs).
#[must_use]
pub fn external_multiaddr(relay: &TokenGoRelay, exposure: &Exposure) -> Option<String> {
    let ip = external_host(relay, exposure)?.parse::<IpAddr>().ok()?;
    Some(format!(
        "{}/udp/{}/quic-v1",
        host_multiaddr(&ip.to_string()),
        relay.spec.dht_port
    ))
}

/// Why a relay asked to announce itself cannot be found, or not reached, through the DHT: it
/// has no IP address to announce, or a `NodePort` Service reaches it on other ports than the
/// ones the node announces (its own). `None` when it does not announce or all is well.
#[must_use]
pub fn announce_problem(
    relay: &TokenGoRelay,
    exposure: &Exposure,
) -> Option<(ReadyReason, String)> {
    let spec = &relay.spec;
    if !spec.dht.announce {
        return None;
    }
    if external_multiaddr(relay, exposure).is_none() {
        let message = match (
            &spec.external_address,
            spec.service.type_,
            &exposure.load_balancer,
        ) {
            (Some(host), _, _) => format!(
                "dht.announce is set but externalAddress {host} is a host name: the node \
                 announces IP addresses only, so nobody can find it on the DHT; set \
                 externalAddress to its IP"
            ),
            (None, ServiceType::LoadBalancer, Some(host)) => format!(
                "dht.announce is set but the load balancer's address {host} is a host name: \
                 the node announces IP addresses only, so nobody can find it on the DHT; set \
                 externalAddress to its IP"
            ),
            (None, ServiceType::LoadBalancer, None) => {
                "dht.announce is set but the LoadBalancer Service has no address yet \
                 (status.loadBalancer.ingress): the relay is announced once it has one; or set \
                 externalAddress to its public IP"
                    .to_owned()
            }
            (None, _, _) => "dht.announce is set but externalAddress is not: the relay has no \
                             address to announce, so nobody can find it on the DHT; set \
                             externalAddress to its public IP"
                .to_owned(),
        };
        return Some((ReadyReason::NoExternalAddress, message));
    }
    if spec.service.type_ == ServiceType::NodePort
        && (exposure.quic_node_port != Some(spec.port)
            || exposure.dht_node_port != Some(spec.dht_port))
    {
        let shown = |p: Option<i32>| p.map_or_else(|| "none yet".to_owned(), |p| p.to_string());
        return Some((
            ReadyReason::NodePortsDiffer,
            format!(
                "dht.announce with a NodePort Service: the node announces its own ports (QUIC \
                 {}, DHT {}) but the Service reaches it on node ports {} and {}, so whoever \
                 finds it on the DHT could not connect; it is not announced. Set port and \
                 service.nodePort to one node port (30000-32767) and dhtPort to another (its \
                 node port follows), or use a LoadBalancer Service",
                spec.port,
                spec.dht_port,
                shown(exposure.quic_node_port),
                shown(exposure.dht_node_port)
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::TokenGoRelaySpec;
    use k8s_openapi::api::core::v1::Container;
    use serde_json::json;

    fn relay(spec: serde_json::Value) -> TokenGoRelay {
        let spec: TokenGoRelaySpec = serde_json::from_value(spec).unwrap();
        let mut relay = TokenGoRelay::new("edge", spec);
        relay.metadata.namespace = Some("net".into());
        relay.metadata.uid = Some("uid-1".into());
        relay
    }

    const PEER: &str = "12D3KooWPeer";

    fn none() -> Exposure {
        Exposure::default()
    }

    fn owner() -> serde_json::Value {
        json!([{
            "apiVersion": "tokengo.io/v1alpha1",
            "kind": "TokenGoRelay",
            "name": "edge",
            "uid": "uid-1",
            "controller": true
        }])
    }

    fn labels() -> serde_json::Value {
        json!({
            "app.kubernetes.io/component": "relay",
            "app.kubernetes.io/instance": "edge",
            "app.kubernetes.io/managed-by": "tokengo-operator",
            "app.kubernetes.io/name": "tokengo-relay"
        })
    }

    fn select() -> serde_json::Value {
        json!({"app.kubernetes.io/instance": "edge", "app.kubernetes.io/name": "tokengo-relay"})
    }

    /// The relay container as the defaults render it, before the DHT settings.
    fn default_container() -> serde_json::Value {
        json!({
            "name": "relay",
            "image": "tokengo/node:latest",
            "args": [
                "relay", "--listen", "0.0.0.0:4433",
                "--data-dir", "/var/lib/tokengo", "--keys-dir", "/etc/tokengo/keys"
            ],
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
    }

    #[test]
    fn deployment_runs_the_relay_locked_down_with_its_identity() {
        let relay = relay(json!({}));
        let deployment =
            serde_json::to_value(deployment(&relay, &Settings::default(), PEER, &none())).unwrap();
        let expected = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "edge-relay",
                "namespace": "net",
                "labels": labels(),
                "ownerReferences": owner()
            },
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": select()},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}
                },
                "template": {
                    "metadata": {
                        "annotations": {"tokengo.io/keys-hash": identity_hash(PEER)},
                        "labels": labels()
                    },
                    "spec": {
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "terminationGracePeriodSeconds": 45,
                        "securityContext": {
                            "fsGroup": 65532,
                            "runAsGroup": 65532,
                            "runAsNonRoot": true,
                            "runAsUser": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}
                        },
                        "containers": [default_container()],
                        "volumes": [
                            {
                                "name": "keys",
                                "secret": {
                                    "secretName": "edge-relay-identity",
                                    "defaultMode": 0o440,
                                    "items": [{"key": RELAY_IDENTITY_FILE, "path": RELAY_IDENTITY_FILE}]
                                }
                            },
                            {"name": "data", "emptyDir": {"sizeLimit": "16Mi"}}
                        ]
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
        let d = deployment(&relay, &Settings::default(), PEER, &none());
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
        // The spec's resources replace the defaults entirely.
        let resources = c.resources.as_ref().unwrap();
        assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "128Mi");
        assert_eq!(resources.requests, None);
    }

    #[test]
    fn node_pods_follow_the_operators_image_settings() {
        let settings = Settings {
            node_image_pull_policy: Some(crate::manifest::PullPolicy::IfNotPresent),
            image_pull_secrets: vec!["registry-a".into(), "registry-b".into()],
            ..Settings::default()
        };
        let d =
            serde_json::to_value(deployment(&relay(json!({})), &settings, PEER, &none())).unwrap();
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["containers"][0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            pod["imagePullSecrets"],
            json!([{"name": "registry-a"}, {"name": "registry-b"}])
        );
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
        let d =
            serde_json::to_value(deployment(&relay, &Settings::default(), PEER, &none())).unwrap();
        let mut expected = default_container();
        expected["env"] = json!([
            {"name": "TOKENGO_LOG_FORMAT", "value": "json"},
            {"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"},
            {"name": "TOKENGO_DHT_ANNOUNCE", "value": "true"},
            {"name": "TOKENGO_DHT_LISTEN", "value": "0.0.0.0:4101"},
            {"name": "TOKENGO_EXTERNAL_ADDRS", "value": "/ip4/203.0.113.7/udp/4101/quic-v1"},
            {"name": "TOKENGO_BOOTSTRAP", "value": "/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB,/dns4/b.example/udp/4001/quic-v1/p2p/12D3KooWC"},
            {"name": "TOKENGO_DHT_PROTOCOL", "value": "/mynet/kad/1.0.0"}
        ]);
        expected["ports"] = json!([
            {"name": "quic", "containerPort": 4433, "protocol": "UDP"},
            {"name": "dht", "containerPort": 4101, "protocol": "UDP"},
            {"name": "admin", "containerPort": 9090, "protocol": "TCP"}
        ]);
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"],
            json!([expected])
        );
        let service = serde_json::to_value(service(&relay)).unwrap();
        assert_eq!(
            service["spec"],
            json!({
                "type": "LoadBalancer",
                "selector": select(),
                "ports": [
                    {"name": "quic", "protocol": "UDP", "port": 4433, "targetPort": "quic"},
                    {"name": "dht", "protocol": "UDP", "port": 4101, "targetPort": "dht"}
                ]
            })
        );
        assert_eq!(announce_problem(&relay, &none()), None);
        // The published relay addresses stay QUIC addresses.
        assert_eq!(
            addresses(&relay, &Settings::default(), PEER, &none())[1],
            format!("/ip4/203.0.113.7/udp/4433/quic-v1/p2p/{PEER}")
        );
    }

    #[test]
    fn the_dht_port_is_default_4001_and_unused_without_announce() {
        let quiet = relay(
            json!({"externalAddress": "203.0.113.7", "dht": {"bootstrap": ["/ip4/10.0.0.1/udp/4001/quic-v1/p2p/12D3KooWB"]}}),
        );
        assert_eq!(quiet.spec.dht_port, 4001);
        let c = container(&quiet, &none());
        assert_eq!(
            env_names(&c),
            ["TOKENGO_LOG_FORMAT", "TOKENGO_ADMIN_LISTEN"]
        );
        assert_eq!(c.ports.as_ref().unwrap().len(), 2);
        assert_eq!(service_ports(&quiet).len(), 1);
        assert_eq!(announce_problem(&quiet, &none()), None);

        let v6 = relay(json!({"externalAddress": "2001:db8::1", "dht": {"announce": true}}));
        assert_eq!(
            external_multiaddr(&v6, &none()).as_deref(),
            Some("/ip6/2001:db8::1/udp/4001/quic-v1")
        );
        assert_eq!(service_ports(&v6)[1].port, 4001);
    }

    #[test]
    fn an_announcing_relay_without_an_ip_is_reported() {
        let missing = relay(json!({"dht": {"announce": true}}));
        let (reason, problem) = announce_problem(&missing, &none()).unwrap();
        assert_eq!(reason, ReadyReason::NoExternalAddress);
        assert!(problem.contains("externalAddress is not"), "{problem}");
        let host =
            relay(json!({"externalAddress": "relay.example.org", "dht": {"announce": true}}));
        let (reason, problem) = announce_problem(&host, &none()).unwrap();
        assert_eq!(reason, ReadyReason::NoExternalAddress);
        assert!(
            problem.contains("relay.example.org is a host name"),
            "{problem}"
        );
        for relay in [&missing, &host] {
            // It still runs and listens for libp2p, but announces no address of its own.
            let c = container(relay, &none());
            assert_eq!(
                env_names(&c),
                [
                    "TOKENGO_LOG_FORMAT",
                    "TOKENGO_ADMIN_LISTEN",
                    "TOKENGO_DHT_ANNOUNCE",
                    "TOKENGO_DHT_LISTEN"
                ]
            );
            assert_eq!(external_multiaddr(relay, &none()), None);
        }
    }

    /// A LoadBalancer without `externalAddress` publishes and announces the load balancer's
    /// own address once it has one; a host name is published but not announced.
    #[test]
    fn a_load_balancers_address_stands_in_for_the_external_address() {
        let lb = relay(json!({"service": {"type": "LoadBalancer"}, "dht": {"announce": true}}));
        let (reason, problem) = announce_problem(&lb, &none()).unwrap();
        assert_eq!(reason, ReadyReason::NoExternalAddress);
        assert!(problem.contains("no address yet"), "{problem}");
        assert_eq!(addresses(&lb, &Settings::default(), PEER, &none()).len(), 1);

        let ip = Exposure {
            load_balancer: Some("198.51.100.20".into()),
            ..Exposure::default()
        };
        assert_eq!(announce_problem(&lb, &ip), None);
        assert_eq!(
            addresses(&lb, &Settings::default(), PEER, &ip)[1],
            format!("/ip4/198.51.100.20/udp/4433/quic-v1/p2p/{PEER}")
        );
        let env = env_values(&container(&lb, &ip));
        assert_eq!(
            env["TOKENGO_EXTERNAL_ADDRS"],
            "/ip4/198.51.100.20/udp/4001/quic-v1"
        );
        // A new address changes the pod template: the pods roll to announce it.
        assert_ne!(
            deployment(&lb, &Settings::default(), PEER, &ip).spec,
            deployment(&lb, &Settings::default(), PEER, &none()).spec
        );

        let name = Exposure {
            load_balancer: Some("lb-1.elb.example".into()),
            ..Exposure::default()
        };
        assert_eq!(
            addresses(&lb, &Settings::default(), PEER, &name)[1],
            format!("/dns/lb-1.elb.example/udp/4433/quic-v1/p2p/{PEER}")
        );
        let (reason, problem) = announce_problem(&lb, &name).unwrap();
        assert_eq!(reason, ReadyReason::NoExternalAddress);
        assert!(
            problem.contains("lb-1.elb.example is a host name"),
            "{problem}"
        );
        assert!(!env_values(&container(&lb, &name)).contains_key("TOKENGO_EXTERNAL_ADDRS"));

        // externalAddress wins over the load balancer's; other Service types have none.
        let set =
            relay(json!({"service": {"type": "LoadBalancer"}, "externalAddress": "203.0.113.7"}));
        assert!(
            addresses(&set, &Settings::default(), PEER, &ip)[1].starts_with("/ip4/203.0.113.7/")
        );
        let node_port = relay(json!({"service": {"type": "NodePort"}}));
        assert_eq!(
            addresses(&node_port, &Settings::default(), PEER, &ip).len(),
            1
        );
    }

    #[test]
    fn exposure_reads_node_ports_and_the_load_balancer() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "edge-relay"},
            "spec": {"type": "LoadBalancer", "ports": [
                {"name": "quic", "protocol": "UDP", "port": 4433, "nodePort": 31001},
                {"name": "dht", "protocol": "UDP", "port": 4001, "nodePort": 31002}
            ]},
            "status": {"loadBalancer": {"ingress": [{"hostname": "lb.example"}, {"ip": "198.51.100.9"}]}}
        }))
        .unwrap();
        assert_eq!(
            exposure(&service),
            Exposure {
                quic_node_port: Some(31001),
                dht_node_port: Some(31002),
                load_balancer: Some("lb.example".into())
            }
        );
        let with_ip: Service = serde_json::from_value(json!({
            "metadata": {"name": "edge-relay"},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.9", "hostname": "lb.example"}]}}
        }))
        .unwrap();
        assert_eq!(
            exposure(&with_ip).load_balancer.as_deref(),
            Some("198.51.100.9"),
            "the IP first"
        );
        assert_eq!(exposure(&Service::default()), Exposure::default());
    }

    /// A NodePort relay publishes the node port Kubernetes allocated, and announces itself on
    /// the DHT only where whoever finds it can connect: when the node ports are its own ports.
    #[test]
    fn a_node_port_relay_publishes_its_node_ports_and_announces_only_matching_ones() {
        let allocated = Exposure {
            quic_node_port: Some(31433),
            dht_node_port: Some(31401),
            load_balancer: None,
        };
        let plain =
            relay(json!({"service": {"type": "NodePort"}, "externalAddress": "203.0.113.7"}));
        assert_eq!(
            addresses(&plain, &Settings::default(), PEER, &allocated)[1],
            format!("/ip4/203.0.113.7/udp/31433/quic-v1/p2p/{PEER}")
        );

        let announcing = relay(json!({
            "service": {"type": "NodePort"}, "externalAddress": "203.0.113.7",
            "dht": {"announce": true}
        }));
        let (reason, problem) = announce_problem(&announcing, &allocated).unwrap();
        assert_eq!(reason, ReadyReason::NodePortsDiffer);
        assert!(
            problem.contains("(QUIC 4433, DHT 4001)")
                && problem.contains("node ports 31433 and 31401"),
            "{problem}"
        );
        assert!(
            !env_values(&container(&announcing, &allocated)).contains_key("TOKENGO_EXTERNAL_ADDRS"),
            "container ports that nobody can reach are never announced"
        );
        // dhtPort outside the node-port range: Kubernetes chooses the dht node port.
        assert_eq!(service_ports(&announcing)[1].node_port, None);

        let matching = relay(json!({
            "service": {"type": "NodePort", "nodePort": 30433}, "port": 30433,
            "dhtPort": 30401, "externalAddress": "203.0.113.7", "dht": {"announce": true}
        }));
        let ports = service_ports(&matching);
        assert_eq!(
            (ports[0].node_port, ports[1].node_port),
            (Some(30433), Some(30401)),
            "the dht node port follows dhtPort"
        );
        let given = Exposure {
            quic_node_port: Some(30433),
            dht_node_port: Some(30401),
            load_balancer: None,
        };
        assert_eq!(announce_problem(&matching, &given), None);
        assert_eq!(
            env_values(&container(&matching, &given))["TOKENGO_EXTERNAL_ADDRS"],
            "/ip4/203.0.113.7/udp/30401/quic-v1"
        );
        assert_eq!(
            addresses(&matching, &Settings::default(), PEER, &given)[1],
            format!("/ip4/203.0.113.7/udp/30433/quic-v1/p2p/{PEER}")
        );
        // Before the Service has its node ports, nothing is announced either.
        assert_eq!(
            announce_problem(&matching, &none()).map(|(r, _)| r),
            Some(ReadyReason::NodePortsDiffer)
        );
    }

    #[test]
    fn a_new_identity_changes_the_pod_template() {
        let relay = relay(json!({}));
        let a = deployment(&relay, &Settings::default(), "12D3KooWA", &none());
        let b = deployment(&relay, &Settings::default(), "12D3KooWB", &none());
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
                    "labels": labels(),
                    "ownerReferences": owner()
                },
                "spec": {
                    "type": "NodePort",
                    "selector": select(),
                    "ports": [{"name": "quic", "protocol": "UDP", "port": 4433, "targetPort": "quic", "nodePort": 30433}]
                }
            })
        );
        // A ClusterIP Service never carries a node port.
        let internal = relay_with_cluster_ip();
        let ports = service_ports(&internal);
        assert_eq!(ports[0].node_port, None);
    }

    #[test]
    fn a_headless_service_names_every_pod() {
        let relay = relay(json!({"port": 5000, "service": {"type": "LoadBalancer"}}));
        let headless = serde_json::to_value(pods_service(&relay)).unwrap();
        assert_eq!(
            headless,
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "edge-relay-pods",
                    "namespace": "net",
                    "labels": labels(),
                    "ownerReferences": owner()
                },
                "spec": {
                    "clusterIP": "None",
                    "publishNotReadyAddresses": true,
                    "selector": select(),
                    "ports": [{"name": "quic", "protocol": "UDP", "port": 5000, "targetPort": "quic"}]
                }
            })
        );
        assert_eq!(
            pods_address(&relay, &Settings::default(), PEER),
            format!("/dns4/edge-relay-pods.net.svc.cluster.local/udp/5000/quic-v1/p2p/{PEER}")
        );
    }

    #[test]
    fn several_pods_get_a_disruption_budget_of_one() {
        assert_eq!(disruption_budget(&relay(json!({}))), None);
        assert_eq!(disruption_budget(&relay(json!({"replicas": 1}))), None);
        let budget =
            serde_json::to_value(disruption_budget(&relay(json!({"replicas": 3})))).unwrap();
        assert_eq!(
            budget,
            json!({
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {
                    "name": "edge-relay",
                    "namespace": "net",
                    "labels": labels(),
                    "ownerReferences": owner()
                },
                "spec": {
                    "maxUnavailable": 1,
                    "selector": {"matchLabels": select()}
                }
            })
        );
    }

    /// The relay container of `relay`'s Deployment.
    fn container(relay: &TokenGoRelay, exposure: &Exposure) -> Container {
        let pod = deployment(relay, &Settings::default(), PEER, exposure)
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        pod.containers.into_iter().next().unwrap()
    }

    fn env_names(container: &Container) -> Vec<String> {
        container
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .collect()
    }

    fn env_values(container: &Container) -> BTreeMap<String, String> {
        container
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    fn relay_with_cluster_ip() -> TokenGoRelay {
        relay(json!({"service": {"type": "ClusterIP", "nodePort": 30433}}))
    }

    fn service_ports(relay: &TokenGoRelay) -> Vec<ServicePort> {
        service(relay).spec.unwrap().ports.unwrap()
    }

    #[test]
    fn identity_secret_is_immutable_and_kept_unless_told_otherwise() {
        let kept = relay(json!({}));
        assert!(kept.spec.retain_identity, "retained by default");
        let secret = identity_secret(&kept, b"key-bytes");
        assert_eq!(secret.metadata.name.as_deref(), Some("edge-relay-identity"));
        assert_eq!(secret.immutable, Some(true));
        let data = secret.data.unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data[RELAY_IDENTITY_FILE].0, b"key-bytes");
        assert_eq!(
            secret.metadata.owner_references, None,
            "a retained identity outlives the relay"
        );
        assert_eq!(
            secret.metadata.labels.unwrap()["app.kubernetes.io/instance"],
            "edge"
        );

        let owned = relay(json!({"retainIdentity": false}));
        let secret = identity_secret(&owned, b"key-bytes");
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
            addresses(&relay(json!({})), &settings, PEER, &none()),
            vec![format!(
                "/dns4/edge-relay.net.svc.cluster.local/udp/4433/quic-v1/p2p/{PEER}"
            )]
        );
        let external = relay(json!({
            "externalAddress": "203.0.113.7",
            "service": {"type": "NodePort", "nodePort": 30433}
        }));
        assert_eq!(
            addresses(&external, &settings, PEER, &none())[1],
            format!("/ip4/203.0.113.7/udp/30433/quic-v1/p2p/{PEER}")
        );
        let dns = relay(
            json!({"externalAddress": "relay.example.org", "service": {"type": "LoadBalancer"}}),
        );
        assert_eq!(
            addresses(&dns, &settings, PEER, &none())[1],
            format!("/dns/relay.example.org/udp/4433/quic-v1/p2p/{PEER}")
        );
        let v6 = relay(json!({"externalAddress": "2001:db8::1"}));
        assert!(
            addresses(&v6, &settings, PEER, &none())[1].starts_with("/ip6/2001:db8::1/udp/4433/")
        );
    }
}
