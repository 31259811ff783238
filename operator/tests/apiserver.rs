//! The operator against a real control plane: etcd, kube-apiserver 1.20 (RBAC on) and
//! kube-controller-manager (its garbage collector), started by `scripts/k8s-cluster` once for
//! this test binary; each test works in its own namespace. The operator side always runs as the
//! chart's ServiceAccount with exactly the chart's RBAC rules (impersonation), so a permission
//! the chart lacks fails here. Every wait is a watch with a deadline.
//!
//! Run with `cargo test -p tokengo-operator --features apiserver-tests --test apiserver`
//! (`.ci/k8s` does). If the control plane cannot be built or started, the tests fail.

// clippy.toml's allow-*-in-tests covers the `#[tokio::test]` functions but not this file's
// helpers (control plane, waits, fixtures), which are neither `#[test]` nor `#[cfg(test)]`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::{Deployment, StatefulSet},
        coordination::v1::Lease,
        core::v1::{Namespace, Secret, Service, ServiceAccount},
        events::v1::Event,
        rbac::v1::{
            ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
        },
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};
use serde_json::json;
use tokengo_operator::{
    keys::{self, Keyring},
    lease::{Elector, LeaseTiming},
    manifest::{KEYS_HASH_ANNOTATION, Settings, exit as exit_manifest},
    metrics::Metrics,
    reconcile::{self, Context, WatchScope},
    resource::{self, TokenGoExit, TokenGoRelay},
    startup,
};
use tokengo_proto::data_dir::{EXIT_IDENTITY_FILE, EXIT_KEYRING_FILE, RELAY_IDENTITY_FILE};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const OPERATOR_NS: &str = "tokengo-system";
const OPERATOR_SA: &str = "tokengo-operator";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The control plane, shared by the tests of this binary. Its supervisor script stops
/// everything when our end of its stdin closes, i.e. when this test process exits.
struct Cluster {
    _supervisor: Mutex<Child>,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let mut crds: Vec<PathBuf> = std::fs::read_dir(repo().join("crds"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        crds.sort();
        start_cluster(&crds)
    })
}

/// A control plane of its own (for a test that needs one without the CRDs); it stops when the
/// returned value is dropped.
fn start_cluster(crds: &[PathBuf]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(repo().join("scripts/k8s-cluster"))
        .arg(dir.path())
        .args(crds)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("scripts/k8s-cluster");
    // The script has its own deadlines (and may first build the API server).
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("ready "),
        "the local control plane did not start (scripts/k8s-cluster said {line:?}); this is a failure, not a skip"
    );
    Cluster {
        kubeconfig: dir.path().join("kubeconfig"),
        _supervisor: Mutex::new(child),
        _dir: dir,
    }
}

async fn config() -> Config {
    config_at(&cluster().kubeconfig).await
}

async fn config_at(path: &std::path::Path) -> Config {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap()
}

/// The cluster administrator (what a test uses to set the scene and to look).
async fn admin() -> Client {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("tokengo_operator=info")
        .try_init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    Client::try_from(config().await).unwrap()
}

/// The operator: the chart's ServiceAccount, with exactly the chart's RBAC rules.
async fn operator_client() -> Client {
    install_chart_rbac().await;
    let mut config = config().await;
    config.auth_info.impersonate =
        Some(format!("system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"));
    Client::try_from(config).unwrap()
}

fn chart_rules(file: &str) -> Vec<PolicyRule> {
    let text = std::fs::read_to_string(repo().join("charts/tokengo/files").join(file)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

async fn install_chart_rbac() {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async { grant_chart_rbac(admin().await).await })
        .await;
}

/// The chart's ServiceAccount with the chart's cluster-wide RBAC (operator rules, CRD rules and
/// the lease Role), as `helm install` with the default values makes them.
async fn grant_chart_rbac(client: Client) {
    {
        let pp = PatchParams::apply("tokengo-tests").force();
        apply(
            &Api::<Namespace>::all(client.clone()),
            OPERATOR_NS,
            json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}
            }),
            &pp,
        )
        .await;
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(OPERATOR_SA.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(client.clone(), OPERATOR_NS)
            .patch(OPERATOR_SA, &pp, &Patch::Apply(&sa))
            .await
            .unwrap();
        let subject = vec![Subject {
            kind: "ServiceAccount".into(),
            name: OPERATOR_SA.into(),
            namespace: Some(OPERATOR_NS.into()),
            ..Default::default()
        }];
        grant_cluster_rules(
            &client,
            "tokengo-operator-test",
            "operator-rules.yaml",
            &subject,
        )
        .await;
        let lease_role = Role {
            metadata: ObjectMeta {
                name: Some("tokengo-operator-lease".into()),
                ..Default::default()
            },
            rules: Some(chart_rules("lease-rules.yaml")),
        };
        Api::<Role>::namespaced(client.clone(), OPERATOR_NS)
            .patch("tokengo-operator-lease", &pp, &Patch::Apply(&lease_role))
            .await
            .unwrap();
        let lease_binding = RoleBinding {
            metadata: ObjectMeta {
                name: Some("tokengo-operator-lease".into()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: "tokengo-operator-lease".into(),
            },
            subjects: Some(subject.clone()),
        };
        Api::<RoleBinding>::namespaced(client.clone(), OPERATOR_NS)
            .patch("tokengo-operator-lease", &pp, &Patch::Apply(&lease_binding))
            .await
            .unwrap();
        grant_cluster_rules(
            &client,
            "tokengo-operator-test-crds",
            "crd-rules.yaml",
            &subject,
        )
        .await;
    }
}

/// A ClusterRole named `name` with the chart's rules file `rules`, bound to `subject`.
async fn grant_cluster_rules(client: &Client, name: &str, rules: &str, subject: &[Subject]) {
    let pp = PatchParams::apply("tokengo-tests").force();
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        rules: Some(chart_rules(rules)),
        ..Default::default()
    };
    Api::<ClusterRole>::all(client.clone())
        .patch(name, &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: name.into(),
        },
        subjects: Some(subject.to_vec()),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(name, &pp, &Patch::Apply(&binding))
        .await
        .unwrap();
}

async fn apply<K>(api: &Api<K>, name: &str, value: serde_json::Value, pp: &PatchParams) -> K
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, pp, &Patch::Apply(value)).await.unwrap()
}

/// A fresh namespace for one test.
async fn namespace(client: &Client, name: &str) -> String {
    let ns = format!("{name}-{}", std::process::id());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    ns
}

/// Waits (a watch, with a deadline) until `cond` holds for the object.
async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, cond: impl Fn(&K) -> bool) -> K
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let found = tokio::time::timeout(
        WAIT,
        await_condition(api.clone(), name, move |obj: Option<&K>| {
            obj.is_some_and(&cond)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {name}: {what}"))
    .unwrap();
    found.unwrap()
}

async fn wait_deleted<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let Some(obj) = api.get_opt(name).await.unwrap() else {
        return;
    };
    let uid = obj.uid().unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(api.clone(), name, conditions::is_deleted(&uid)),
    )
    .await
    .unwrap_or_else(|_| panic!("{name} was not garbage-collected"))
    .unwrap();
}

fn ready(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Option<(&str, &str)> {
    conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// Stands in for the kubelet and the ReplicaSet controller (absent here): marks a Deployment's
/// current generation rolled out with every replica ready.
async fn mark_rolled_out(client: &Client, ns: &str, name: &str) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let d = api.get(name).await.unwrap();
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "observedGeneration": d.metadata.generation,
            "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas
        }})),
    )
    .await
    .unwrap();
}

/// Stands in for the kubelet and the StatefulSet controller (absent here): marks a
/// StatefulSet's current generation rolled out, every replica of one revision and ready.
async fn mark_set_rolled_out(client: &Client, ns: &str, name: &str) {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let set = api.get(name).await.unwrap();
    let replicas = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let revision = format!("{name}-r{}", set.metadata.generation.unwrap_or(0));
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "observedGeneration": set.metadata.generation,
            "replicas": replicas, "readyReplicas": replicas,
            "currentReplicas": replicas, "updatedReplicas": replicas,
            "currentRevision": revision, "updateRevision": revision
        }})),
    )
    .await
    .unwrap();
}

/// The controllers, running as the chart's ServiceAccount until stopped.
struct Operator {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
}

async fn start_operator() -> Operator {
    let client = operator_client().await;
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(Context::new(
        client,
        Settings::default(),
        metrics.clone(),
        Some("test".into()),
    ));
    let stop = CancellationToken::new();
    let task = tokio::spawn(reconcile::run(ctx, stop.clone()));
    Operator {
        stop,
        task,
        metrics,
    }
}

impl Operator {
    async fn stop(self) -> Arc<Metrics> {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
        self.metrics
    }

    /// Stops the operator and asserts it hit no reconcile error on the way.
    async fn stop_without_errors(self) {
        let text = self.stop().await.render();
        assert!(
            !text.contains(r#"result="error""#),
            "the operator hit errors (RBAC?):\n{text}"
        );
    }
}

fn resource_versions<K: Resource>(items: &[K]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|o| {
            (
                o.meta().name.clone().unwrap_or_default(),
                o.meta().resource_version.clone().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn crds_are_established_and_are_the_codes() {
    let client = admin().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for crd in resource::definitions() {
        let name = crd.name_any();
        // Applying the code's CRDs over the committed ones (installed at start) is a no-op.
        let before = crds.get(&name).await.unwrap();
        let after = crds
            .patch(
                &name,
                &PatchParams::apply("tokengo-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .unwrap();
        assert_eq!(
            before.spec, after.spec,
            "{name}: the committed CRD differs from the code"
        );
        tokio::time::timeout(
            WAIT,
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap()
        .unwrap();
    }
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_the_api_server() {
    let client = admin().await;
    let ns = namespace(&client, "invalid").await;
    let exits: Api<TokenGoExit> = Api::namespaced(client.clone(), &ns);
    let relays: Api<TokenGoRelay> = Api::namespaced(client.clone(), &ns);
    let exit = |spec: serde_json::Value| json!({"apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoExit", "metadata": {"name": "x"}, "spec": spec});
    let relay = |spec: serde_json::Value| json!({"apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": "x"}, "spec": spec});
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let good_exit = json!({"backend": {"url": "http://ollama:11434"}, "relay": {"name": "edge"}});
    exits
        .create(&pp, &serde_json::from_value(exit(good_exit)).unwrap())
        .await
        .expect("a valid exit is accepted");
    relays
        .create(&pp, &serde_json::from_value(relay(json!({}))).unwrap())
        .await
        .expect("a valid relay is accepted");

    let bad_exits = [
        ("no backend", json!({"relay": {"name": "edge"}})),
        (
            "not http",
            json!({"backend": {"url": "ftp://files.example"}, "relay": {"name": "edge"}}),
        ),
        (
            "two relay sources",
            json!({"backend": {"url": "http://o:1"}, "relay": {"name": "edge", "addresses": ["/ip4/1.2.3.4/udp/4433/quic-v1/p2p/12D3KooWA"]}}),
        ),
        (
            "no relay source",
            json!({"backend": {"url": "http://o:1"}, "relay": {}}),
        ),
        (
            "not a multiaddr",
            json!({"backend": {"url": "http://o:1"}, "relay": {"addresses": ["1.2.3.4:4433"]}}),
        ),
        (
            "too many replicas",
            json!({"backend": {"url": "http://o:1"}, "relay": {"name": "e"}, "replicas": 21}),
        ),
        (
            "rotation of 0 h",
            json!({"backend": {"url": "http://o:1"}, "relay": {"name": "e"}, "keyRotation": {"intervalHours": 0}}),
        ),
        (
            "header injection",
            json!({"backend": {"url": "http://o:1", "headers": [{"name": "X-A", "value": "a\r\nB: c"}]}, "relay": {"name": "e"}}),
        ),
        (
            "max relays of 0",
            json!({"backend": {"url": "http://o:1"}, "relay": {"dht": {"maxRelays": 0}}}),
        ),
        (
            "bad DHT protocol",
            json!({"backend": {"url": "http://o:1"}, "relay": {"dht": {"protocol": "mynet kad"}}}),
        ),
        (
            "bad secret name",
            json!({"backend": {"url": "http://o:1", "apiKeySecret": {"name": "Not_A_Name", "key": "k"}}, "relay": {"name": "e"}}),
        ),
    ];
    for (what, spec) in bad_exits {
        let value = exit(spec);
        let raw = client
            .request::<serde_json::Value>(http_post(
                &format!("/apis/tokengo.io/v1alpha1/namespaces/{ns}/tokengoexits?dryRun=All"),
                &value,
            ))
            .await;
        match raw {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 422, "{what}: {status:?}"),
            other => panic!("{what}: accepted: {other:?}"),
        }
    }
    let bad_relays = [
        ("zero replicas", json!({"replicas": 0})),
        ("port out of range", json!({"port": 70000})),
        (
            "unknown service type",
            json!({"service": {"type": "Ingress"}}),
        ),
        (
            "node port out of range",
            json!({"service": {"type": "NodePort", "nodePort": 80}}),
        ),
        (
            "bad bootstrap",
            json!({"dht": {"announce": true, "bootstrap": ["peer.example:4001"]}}),
        ),
        ("DHT port out of range", json!({"dhtPort": 0})),
        (
            "bad external address",
            json!({"externalAddress": "http://x"}),
        ),
    ];
    for (what, spec) in bad_relays {
        let raw = client
            .request::<serde_json::Value>(http_post(
                &format!("/apis/tokengo.io/v1alpha1/namespaces/{ns}/tokengorelays?dryRun=All"),
                &relay(spec),
            ))
            .await;
        match raw {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 422, "{what}: {status:?}"),
            other => panic!("{what}: accepted: {other:?}"),
        }
    }
}

fn http_post(path: &str, body: &serde_json::Value) -> http::Request<Vec<u8>> {
    http::Request::post(path)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .unwrap()
}

/// The whole life of a relay and an exit: children with owner references, status, a no-op
/// second reconcile, keys that survive an operator restart, rotation with overlap, events, and
/// garbage collection on delete (key Secrets kept: identities are retained by default). All of
/// it as the chart's ServiceAccount.
#[tokio::test]
async fn relay_and_exit_lifecycle() {
    let client = admin().await;
    let ns = namespace(&client, "life").await;
    let relays: Api<TokenGoRelay> = Api::namespaced(client.clone(), &ns);
    let exits: Api<TokenGoExit> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let operator = start_operator().await;

    // --- Relay: children, owner references, status.
    relays
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay",
            "metadata": {"name": "edge"},
            "spec": {"service": {"type": "NodePort", "nodePort": 30433}, "externalAddress": "203.0.113.7"}
        })).unwrap())
        .await
        .unwrap();
    let relay = wait_for(&relays, "edge", "status with PeerId", |r: &TokenGoRelay| {
        r.status
            .as_ref()
            .is_some_and(|s| s.peer_id.is_some() && s.observed_generation == r.metadata.generation)
    })
    .await;
    let status = relay.status.clone().unwrap();
    assert_eq!(ready(&status.conditions), Some(("False", "Progressing")));
    let relay_peer = status.peer_id.clone().unwrap();
    assert_eq!(
        status.addresses,
        vec![
            format!("/dns4/edge-relay.{ns}.svc.cluster.local/udp/4433/quic-v1/p2p/{relay_peer}"),
            format!("/ip4/203.0.113.7/udp/30433/quic-v1/p2p/{relay_peer}"),
        ]
    );
    let identity = secrets.get("edge-relay-identity").await.unwrap();
    assert_eq!(
        keys::peer_id(&identity.data.as_ref().unwrap()[RELAY_IDENTITY_FILE].0)
            .unwrap()
            .to_string(),
        relay_peer
    );
    assert!(
        identity.owner_references().is_empty(),
        "a retained identity has no owner"
    );
    let service = services.get("edge-relay").await.unwrap();
    let port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.protocol.as_deref(), port.node_port),
        (Some("UDP"), Some(30433))
    );
    let headless = services.get("edge-relay-pods").await.unwrap();
    let relay_deployment = deployments.get("edge-relay").await.unwrap();
    for owners in [
        service.owner_references(),
        headless.owner_references(),
        relay_deployment.owner_references(),
    ] {
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].uid.as_str()),
            ("TokenGoRelay", relay.uid().unwrap().as_str())
        );
        assert_eq!(owners[0].controller, Some(true));
    }
    mark_rolled_out(&client, &ns, "edge-relay").await;
    wait_for(&relays, "edge", "Ready=True", |r: &TokenGoRelay| {
        r.status.as_ref().and_then(|s| ready(&s.conditions)) == Some(("True", "Available"))
    })
    .await;

    // --- Exit naming the relay: given the relay's headless name (every relay pod).
    exits
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoExit",
            "metadata": {"name": "llm"},
            "spec": {
                "backend": {"url": "http://ollama.models.svc:11434", "apiKeySecret": {"name": "backend", "key": "token"}},
                "relay": {"name": "edge"}
            }
        })).unwrap())
        .await
        .unwrap();
    let exit = wait_for(&exits, "llm", "status with keys", |e: &TokenGoExit| {
        e.status
            .as_ref()
            .is_some_and(|s| !s.keys.is_empty() && !s.relays.is_empty())
    })
    .await;
    let exit_status = exit.status.clone().unwrap();
    assert_eq!(exit_status.observed_generation, exit.metadata.generation);
    let pods_address =
        format!("/dns4/edge-relay-pods.{ns}.svc.cluster.local/udp/4433/quic-v1/p2p/{relay_peer}");
    assert_eq!(exit_status.relays, vec![pods_address.clone()]);
    assert_eq!(exit_status.keys.len(), 1);
    assert_eq!(exit_status.identities.len(), 1);
    assert_eq!(
        Some(&exit_status.identities[0].peer_id),
        exit_status.peer_id.as_ref()
    );
    let exit_set = sets.get("llm-exit").await.unwrap();
    let container = &exit_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(container.args.as_ref().unwrap()[2], pods_address);
    let keys_secret = secrets.get("llm-exit-keys").await.unwrap();
    assert!(keys_secret.owner_references().is_empty(), "retained");
    let owners = exit_set.owner_references();
    assert_eq!(
        (owners[0].kind.as_str(), owners[0].uid.as_str()),
        ("TokenGoExit", exit.uid().unwrap().as_str())
    );
    let ring = Keyring::parse(&keys_secret.data.as_ref().unwrap()["0.ohttp_keys.json"].0).unwrap();
    assert_eq!(
        exit_status.keys[0].config,
        hex::encode(ring.public_keys()[0].config.encode()),
        "status publishes the Secret's key"
    );
    mark_set_rolled_out(&client, &ns, "llm-exit").await;
    let exit = wait_for(&exits, "llm", "Ready=True", |e: &TokenGoExit| {
        e.status.as_ref().and_then(|s| ready(&s.conditions)) == Some(("True", "Available"))
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.contains(&"IdentityCreated".to_owned()),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"KeysCreated".to_owned()), "{reasons:?}");

    // --- A second reconcile of unchanged resources writes nothing.
    operator.stop_without_errors().await;
    let snapshot = || async {
        (
            resource_versions(&relays.list(&ListParams::default()).await.unwrap().items),
            resource_versions(&exits.list(&ListParams::default()).await.unwrap().items),
            resource_versions(&secrets.list(&ListParams::default()).await.unwrap().items),
            resource_versions(
                &deployments
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items,
            ),
            resource_versions(&sets.list(&ListParams::default()).await.unwrap().items),
            resource_versions(&services.list(&ListParams::default()).await.unwrap().items),
        )
    };
    let before = snapshot().await;
    let ctx = Arc::new(Context::new(
        operator_client().await,
        Settings::default(),
        Arc::new(Metrics::new()),
        None,
    ));
    reconcile::relay::reconcile(Arc::new(relays.get("edge").await.unwrap()), ctx.clone())
        .await
        .unwrap();
    reconcile::exit::reconcile(Arc::new(exits.get("llm").await.unwrap()), ctx.clone())
        .await
        .unwrap();
    reconcile::relay::reconcile(Arc::new(relays.get("edge").await.unwrap()), ctx.clone())
        .await
        .unwrap();
    reconcile::exit::reconcile(Arc::new(exits.get("llm").await.unwrap()), ctx)
        .await
        .unwrap();
    assert_eq!(
        snapshot().await,
        before,
        "re-reconciling unchanged resources changed something"
    );

    // --- A new operator (a restart) keeps every key: change both to make it act, then compare.
    let identity_before = secrets.get("edge-relay-identity").await.unwrap();
    let keys_before = secrets.get("llm-exit-keys").await.unwrap();
    let operator = start_operator().await;
    let pp = PatchParams::default();
    relays
        .patch("edge", &pp, &Patch::Merge(json!({"spec": {"replicas": 2}})))
        .await
        .unwrap();
    exits
        .patch(
            "llm",
            &pp,
            &Patch::Merge(
                json!({"spec": {"backend": {"headers": [{"name": "X-Team", "value": "ml"}]}}}),
            ),
        )
        .await
        .unwrap();
    wait_for(
        &deployments,
        "edge-relay",
        "2 replicas",
        |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas) == Some(2),
    )
    .await;
    wait_for(&sets, "llm-exit", "the header", |s: &StatefulSet| {
        s.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .is_some_and(|p| {
                p.containers[0]
                    .args
                    .as_ref()
                    .is_some_and(|a| a.contains(&"X-Team: ml".to_owned()))
            })
    })
    .await;
    let identity_after = secrets.get("edge-relay-identity").await.unwrap();
    let keys_after = secrets.get("llm-exit-keys").await.unwrap();
    assert_eq!(
        identity_after.data, identity_before.data,
        "relay identity changed on restart"
    );
    assert_eq!(
        identity_after.resource_version(),
        identity_before.resource_version()
    );
    assert_eq!(
        keys_after.data, keys_before.data,
        "exit keys changed on restart"
    );
    assert_eq!(
        keys_after.resource_version(),
        keys_before.resource_version()
    );
    // Both replicas of the relay mount the one identity Secret.
    let relay_pod = deployments
        .get("edge-relay")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    assert_eq!(
        relay_pod.volumes.unwrap()[0]
            .secret
            .as_ref()
            .unwrap()
            .secret_name
            .as_deref(),
        Some("edge-relay-identity")
    );

    // --- Rotation on request: a new current key, the previous one kept; no pod rolls (the
    // pods follow their keyring in the mounted Secret).
    let hash_before = set_template_hash(&sets, "llm-exit").await;
    exits
        .patch(
            "llm",
            &pp,
            &Patch::Merge(
                json!({"metadata": {"annotations": {exit_manifest::ROTATE_ANNOTATION: "now"}}}),
            ),
        )
        .await
        .unwrap();
    let rotated = wait_for(&exits, "llm", "two keys", |e: &TokenGoExit| {
        e.status.as_ref().is_some_and(|s| s.keys.len() == 2)
    })
    .await;
    let rotated_keys = rotated.status.unwrap().keys;
    assert_eq!(
        rotated_keys[1],
        exit.status.as_ref().unwrap().keys[0],
        "the previous key is kept for the overlap"
    );
    assert_ne!(rotated_keys[0].key_id, rotated_keys[1].key_id);
    let secret = secrets.get("llm-exit-keys").await.unwrap();
    let ring = Keyring::parse(&secret.data.as_ref().unwrap()["0.ohttp_keys.json"].0).unwrap();
    assert_eq!(ring.public_keys().len(), 2);
    assert_eq!(
        secret.data.as_ref().unwrap()["0.exit_identity.key"],
        keys_before.data.as_ref().unwrap()["0.exit_identity.key"],
        "rotation never touches the identity"
    );
    assert_eq!(
        secret.annotations()[exit_manifest::ROTATION_HANDLED_ANNOTATION],
        "now"
    );
    // The status with both keys was written after that pass applied the StatefulSet.
    assert_eq!(
        set_template_hash(&sets, "llm-exit").await,
        hash_before,
        "a rotation changes no pod template"
    );
    // The request is carried out once: another reconcile does not rotate again.
    let ctx = Arc::new(Context::new(
        operator_client().await,
        Settings::default(),
        Arc::new(Metrics::new()),
        None,
    ));
    reconcile::exit::reconcile(Arc::new(exits.get("llm").await.unwrap()), ctx)
        .await
        .unwrap();
    assert_eq!(
        secrets
            .get("llm-exit-keys")
            .await
            .unwrap()
            .resource_version(),
        secret.resource_version()
    );
    let events = Api::<Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("KeysRotated"))
    );

    // --- Least privilege: the operator can never delete a key Secret, nor its workloads
    // but the Deployment an earlier version made (the GC removes children).
    let as_operator = operator_client().await;
    match Api::<Secret>::namespaced(as_operator.clone(), &ns)
        .delete("edge-relay-identity", &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("the operator may delete Secrets: {other:?}"),
    }
    match Api::<StatefulSet>::namespaced(as_operator, &ns)
        .delete("llm-exit", &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("the operator may delete StatefulSets: {other:?}"),
    }

    // --- Deleting the resources garbage-collects every child but the retained keys.
    relays
        .delete("edge", &DeleteParams::default())
        .await
        .unwrap();
    exits.delete("llm", &DeleteParams::default()).await.unwrap();
    wait_deleted(&services, "edge-relay").await;
    wait_deleted(&services, "edge-relay-pods").await;
    wait_deleted(&deployments, "edge-relay").await;
    wait_deleted(&sets, "llm-exit").await;
    assert!(
        secrets
            .get_opt("edge-relay-identity")
            .await
            .unwrap()
            .is_some()
    );
    assert!(secrets.get_opt("llm-exit-keys").await.unwrap().is_some());
    operator.stop_without_errors().await;
}

async fn set_template_hash(sets: &Api<StatefulSet>, name: &str) -> String {
    sets.get(name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()[KEYS_HASH_ANNOTATION]
        .clone()
}

/// An exit naming a relay that does not exist waits with a reason and starts once it appears;
/// explicit addresses need no relay; DHT discovery runs one container that finds relays itself.
#[tokio::test]
async fn exit_relay_sources() {
    let client = admin().await;
    let ns = namespace(&client, "sources").await;
    let exits: Api<TokenGoExit> = Api::namespaced(client.clone(), &ns);
    let relays: Api<TokenGoRelay> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let operator = start_operator().await;
    let exit = |name: &str, relay: serde_json::Value| -> TokenGoExit {
        serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoExit", "metadata": {"name": name},
            "spec": {"backend": {"url": "http://backend:8000"}, "relay": relay}
        }))
        .unwrap()
    };
    let reason = |e: &TokenGoExit| {
        e.status
            .as_ref()
            .and_then(|s| ready(&s.conditions))
            .map(|(_, r)| r.to_owned())
    };
    exits
        .create(
            &PostParams::default(),
            &exit("waits", json!({"name": "later"})),
        )
        .await
        .unwrap();
    wait_for(&exits, "waits", "RelayNotFound", move |e: &TokenGoExit| {
        reason(e).as_deref() == Some("RelayNotFound")
    })
    .await;
    assert!(sets.get_opt("waits-exit").await.unwrap().is_none());
    relays
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": "later"}, "spec": {}
        })).unwrap())
        .await
        .unwrap();
    // The relay's status change triggers the exit (a watch, not a timer).
    wait_for(
        &sets,
        "waits-exit",
        "created once the relay has a PeerId",
        |_: &StatefulSet| true,
    )
    .await;

    let addrs = vec![
        "/dns4/relay-a.example/udp/4433/quic-v1/p2p/12D3KooWA".to_owned(),
        "/ip4/198.51.100.2/udp/4433/quic-v1/p2p/12D3KooWB".to_owned(),
    ];
    exits
        .create(
            &PostParams::default(),
            &exit("direct", json!({"addresses": addrs})),
        )
        .await
        .unwrap();
    let d = wait_for(&sets, "direct-exit", "created", |_: &StatefulSet| true).await;
    let containers = d.spec.unwrap().template.spec.unwrap().containers;
    assert_eq!(
        containers.len(),
        1,
        "one exit container keeps a tunnel to every relay"
    );
    assert_eq!(
        containers[0].args.as_ref().unwrap()[..5],
        ["exit", "--relay", &addrs[0], "--relay", &addrs[1]]
    );

    let bootstrap = "/ip4/10.0.0.5/udp/4001/quic-v1/p2p/12D3KooWBoot";
    exits
        .create(
            &PostParams::default(),
            &exit(
                "dht",
                json!({"dht": {"bootstrap": [bootstrap], "maxRelays": 2}}),
            ),
        )
        .await
        .unwrap();
    let d = wait_for(&sets, "dht-exit", "created", |_: &StatefulSet| true).await;
    let containers = d.spec.unwrap().template.spec.unwrap().containers;
    assert_eq!(containers.len(), 1, "one discovering exit container");
    assert_eq!(
        containers[0].args.as_deref().unwrap(),
        [
            "exit",
            "--backend",
            "http://backend:8000",
            "--data-dir",
            "/var/lib/tokengo",
            "--keys-dir",
            "/etc/tokengo/keys/$(POD_NAME)"
        ],
        "no --relay: the node discovers relays"
    );
    let env: Vec<(String, String)> = containers[0]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert!(
        env.contains(&("TOKENGO_BOOTSTRAP".to_owned(), bootstrap.to_owned())),
        "{env:?}"
    );
    assert!(
        env.contains(&("TOKENGO_MAX_RELAYS".to_owned(), "2".to_owned())),
        "{env:?}"
    );
    // Readiness comes from the StatefulSet, as in the other modes; no relays are listed.
    wait_for(&exits, "dht", "Progressing", move |e: &TokenGoExit| {
        reason(e).as_deref() == Some("Progressing")
    })
    .await;
    mark_set_rolled_out(&client, &ns, "dht-exit").await;
    let done = wait_for(&exits, "dht", "Available", move |e: &TokenGoExit| {
        reason(e).as_deref() == Some("Available")
    })
    .await;
    let status = done.status.unwrap();
    assert!(status.relays.is_empty(), "{:?}", status.relays);
    assert!(status.peer_id.is_some());
    operator.stop_without_errors().await;
}

/// A relay asked to announce itself on the DHT without an IP to announce runs but reports
/// `NoExternalAddress` (and a Warning event); given an IP, it listens on the DHT port, the
/// Service exposes it, and readiness comes from the Deployment again.
#[tokio::test]
async fn an_announcing_relay_needs_an_external_ip() {
    let client = admin().await;
    let ns = namespace(&client, "announce").await;
    let relays: Api<TokenGoRelay> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let operator = start_operator().await;
    let reason = |r: &TokenGoRelay| {
        r.status
            .as_ref()
            .and_then(|s| ready(&s.conditions))
            .map(|(status, reason)| (status.to_owned(), reason.to_owned()))
    };
    relays
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": "dark"},
            "spec": {"dht": {"announce": true}}
        })).unwrap())
        .await
        .unwrap();
    let dark = wait_for(
        &relays,
        "dark",
        "NoExternalAddress",
        move |r: &TokenGoRelay| {
            reason(r) == Some(("False".to_owned(), "NoExternalAddress".to_owned()))
        },
    )
    .await;
    let condition = &dark.status.as_ref().unwrap().conditions[0];
    assert!(
        condition.message.contains("externalAddress"),
        "{}",
        condition.message
    );
    // It still runs (its in-cluster address works), and still gets its status facts.
    assert!(deployments.get_opt("dark-relay").await.unwrap().is_some());
    assert!(dark.status.as_ref().unwrap().peer_id.is_some());
    // Even once its pods are ready.
    mark_rolled_out(&client, &ns, "dark-relay").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        reason(&relays.get("dark").await.unwrap()),
        Some(("False".to_owned(), "NoExternalAddress".to_owned()))
    );
    let events = Api::<Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    let warnings: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("NoExternalAddress"))
        .collect();
    assert!(!warnings.is_empty(), "no NoExternalAddress event");
    assert!(
        warnings
            .iter()
            .all(|e| e.type_.as_deref() == Some("Warning"))
    );

    // A host name is no better: the node announces IPs only.
    relays
        .patch(
            "dark",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"externalAddress": "relay.example.org"}})),
        )
        .await
        .unwrap();
    wait_for(&relays, "dark", "host name reported", |r: &TokenGoRelay| {
        r.status.as_ref().is_some_and(|s| {
            s.observed_generation == r.metadata.generation
                && s.conditions
                    .iter()
                    .any(|c| c.reason == "NoExternalAddress" && c.message.contains("host name"))
        })
    })
    .await;

    // An IP: announced with the DHT port, and Ready from the Deployment again.
    relays
        .patch(
            "dark",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"externalAddress": "203.0.113.9", "dhtPort": 4101}})),
        )
        .await
        .unwrap();
    let d = wait_for(
        &deployments,
        "dark-relay",
        "external address",
        |d: &Deployment| {
            d.spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|p| p.containers[0].env.as_ref())
                .is_some_and(|env| env.iter().any(|e| e.name == "TOKENGO_EXTERNAL_ADDRS"))
        },
    )
    .await;
    let container = &d.spec.unwrap().template.spec.unwrap().containers[0];
    let env: BTreeMap<String, String> = container
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert_eq!(env["TOKENGO_DHT_ANNOUNCE"], "true");
    assert_eq!(env["TOKENGO_DHT_LISTEN"], "0.0.0.0:4101");
    assert_eq!(
        env["TOKENGO_EXTERNAL_ADDRS"],
        "/ip4/203.0.113.9/udp/4101/quic-v1"
    );
    let ports = services
        .get("dark-relay")
        .await
        .unwrap()
        .spec
        .unwrap()
        .ports
        .unwrap();
    let dht = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("dht"))
        .expect("the Service exposes the DHT port");
    assert_eq!((dht.port, dht.protocol.as_deref()), (4101, Some("UDP")));
    mark_rolled_out(&client, &ns, "dark-relay").await;
    wait_for(&relays, "dark", "Ready=True", move |r: &TokenGoRelay| {
        reason(r) == Some(("True".to_owned(), "Available".to_owned()))
    })
    .await;
    operator.stop_without_errors().await;
}

/// A key Secret that is not readable as keys is reported and left alone, never replaced.
#[tokio::test]
async fn a_broken_key_secret_is_never_overwritten() {
    let client = admin().await;
    let ns = namespace(&client, "broken").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let relays: Api<TokenGoRelay> = Api::namespaced(client.clone(), &ns);
    let junk = Secret {
        metadata: ObjectMeta {
            name: Some("odd-relay-identity".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            RELAY_IDENTITY_FILE.to_owned(),
            ByteString(b"junk".to_vec()),
        )])),
        ..Default::default()
    };
    let junk = secrets.create(&PostParams::default(), &junk).await.unwrap();
    let operator = start_operator().await;
    relays
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": "odd"}, "spec": {}
        })).unwrap())
        .await
        .unwrap();
    wait_for(&relays, "odd", "InvalidKeySecret", |r: &TokenGoRelay| {
        r.status.as_ref().and_then(|s| ready(&s.conditions)) == Some(("False", "InvalidKeySecret"))
    })
    .await;
    operator.stop().await;
    let after = secrets.get("odd-relay-identity").await.unwrap();
    assert_eq!(after.resource_version(), junk.resource_version());
    assert!(
        Api::<Deployment>::namespaced(client, &ns)
            .get_opt("odd-relay")
            .await
            .unwrap()
            .is_none()
    );
}

/// Two candidates for one Lease: one leads; the other takes over when it is released or when
/// it expires unrenewed. As the chart's ServiceAccount (its lease Role).
#[tokio::test]
async fn leader_election_admits_one_leader() {
    let client = operator_client().await;
    let leases: Api<Lease> = Api::namespaced(client, OPERATOR_NS);
    let timing = LeaseTiming::new(
        Duration::from_secs(2),
        Duration::from_secs(1),
        Duration::from_millis(200),
    )
    .unwrap();
    let name = format!("election-{}", std::process::id());
    let a = Elector::new(leases.clone(), &name, "a", timing.clone());
    let b = Elector::new(leases.clone(), &name, "b", timing);
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(!b.try_acquire_or_renew().await.unwrap(), "two leaders");
    assert!(a.try_acquire_or_renew().await.unwrap(), "renewal");
    a.release().await.unwrap();
    assert!(
        b.try_acquire_or_renew().await.unwrap(),
        "released lease not taken over"
    );
    assert!(!a.try_acquire_or_renew().await.unwrap());
    // b stops renewing: a takes over once b's lease has expired (bounded wait).
    let cancel = CancellationToken::new();
    let took = tokio::time::timeout(Duration::from_secs(15), a.acquire(&cancel))
        .await
        .unwrap();
    assert!(took);
    let lease = leases.get(&name).await.unwrap();
    assert_eq!(
        lease.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("a")
    );
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(2));
}

/// The real binary: waits for the lease, reconciles as the chart's ServiceAccount, answers its
/// probes, and on SIGTERM stops, releasing the lease.
#[tokio::test]
async fn operator_binary_leads_serves_and_shuts_down() {
    let client = admin().await;
    install_chart_rbac().await;
    let ns = namespace(&client, "binary").await;
    // A kubeconfig that impersonates the ServiceAccount, as the pod's own token would name it.
    let dir = tempfile::tempdir().unwrap();
    let mut kubeconfig: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&cluster().kubeconfig).unwrap()).unwrap();
    kubeconfig["users"][0]["user"]["as"] =
        json!(format!("system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"));
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, serde_yaml_ng::to_string(&kubeconfig).unwrap()).unwrap();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let lease_name = format!("binary-{}", std::process::id());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo-operator"))
        .env("KUBECONFIG", &path)
        .env("POD_NAMESPACE", OPERATOR_NS)
        .env("POD_NAME", "operator-0")
        .env("TOKENGO_LEASE_NAME", &lease_name)
        .env("TOKENGO_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NS);
    wait_for(&leases, &lease_name, "held by operator-0", |l: &Lease| {
        l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some("operator-0")
    })
    .await;
    let relays: Api<TokenGoRelay> = Api::namespaced(client.clone(), &ns);
    relays
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": "bin"}, "spec": {}
        })).unwrap())
        .await
        .unwrap();
    wait_for(&relays, "bin", "PeerId", |r: &TokenGoRelay| {
        r.status.as_ref().is_some_and(|s| s.peer_id.is_some())
    })
    .await;
    let metrics = http_get(admin_port, "/metrics").await;
    assert!(metrics.contains("tokengo_operator_leader 1"), "{metrics}");
    assert!(
        metrics.contains(r#"kind="TokenGoRelay",result="success""#),
        "{metrics}"
    );
    assert!(
        http_get(admin_port, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );

    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let lease = leases.get(&lease_name).await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity,
        None,
        "the lease is released on shutdown"
    );
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// Scheduled rotation: an exit whose key is older than its interval gets a new current key on
/// the next reconcile, the old one kept as previous. The old key is set up by creating the key
/// Secret before the exit (as a user bringing their own keys would), dated two hours back.
#[tokio::test]
async fn an_expired_key_is_rotated_on_schedule() {
    let client = admin().await;
    let ns = namespace(&client, "schedule").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let exits: Api<TokenGoExit> = Api::namespaced(client.clone(), &ns);
    let now = k8s_openapi::jiff::Timestamp::now()
        .as_second()
        .unsigned_abs();
    let old = Keyring::generate(1, now - 7200).unwrap();
    let old_config = hex::encode(old.public_keys()[0].config.encode());
    let identity = keys::new_identity().unwrap();
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("aged-exit-keys".into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([
                    (EXIT_IDENTITY_FILE.to_owned(), ByteString(identity.to_vec())),
                    (
                        EXIT_KEYRING_FILE.to_owned(),
                        ByteString(old.encode().to_vec()),
                    ),
                ])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let operator = start_operator().await;
    exits
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoExit", "metadata": {"name": "aged"},
            "spec": {
                "backend": {"url": "http://backend:8000"},
                "relay": {"addresses": ["/ip4/198.51.100.2/udp/4433/quic-v1/p2p/12D3KooWB"]},
                "keyRotation": {"intervalHours": 1}
            }
        })).unwrap())
        .await
        .unwrap();
    let exit = wait_for(&exits, "aged", "rotated keys", |e: &TokenGoExit| {
        e.status.as_ref().is_some_and(|s| s.keys.len() == 2)
    })
    .await;
    let status = exit.status.unwrap();
    assert_eq!(
        status.keys[1].config, old_config,
        "the old key stays as the previous one"
    );
    assert_eq!(status.keys[1].key_id, 1);
    assert_eq!(status.keys[0].key_id, 2);
    assert_eq!(
        status.peer_id.unwrap(),
        keys::peer_id(&identity).unwrap().to_string(),
        "the identity is kept"
    );
    // The Secret written before exits had one identity per replica now holds it as replica
    // 0's, under ordinal 0's names.
    let data = secrets.get("aged-exit-keys").await.unwrap().data.unwrap();
    assert_eq!(data["0.exit_identity.key"].0, *identity);
    assert!(!data.contains_key(EXIT_IDENTITY_FILE));
    assert!(!data.contains_key(EXIT_KEYRING_FILE));
    operator.stop().await;
}

/// A kubeconfig for `cluster_kubeconfig`'s cluster that impersonates `user`, written into `dir`.
fn impersonating_kubeconfig(
    cluster_kubeconfig: &std::path::Path,
    user: &str,
    dir: &std::path::Path,
) -> PathBuf {
    let mut kubeconfig: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(cluster_kubeconfig).unwrap()).unwrap();
    kubeconfig["users"][0]["user"]["as"] = json!(user);
    let path = dir.join(format!("kubeconfig-{}", user.replace(':', "-")));
    std::fs::write(&path, serde_yaml_ng::to_string(&kubeconfig).unwrap()).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator binary with `kubeconfig`, its own lease and admin port, and `args`; its log
/// goes to the file `log` (a file, not a pipe: nobody has to drain it while it runs).
struct Binary {
    command: tokio::process::Command,
    port: u16,
    log: PathBuf,
}

fn operator_binary(
    kubeconfig: &std::path::Path,
    lease: &str,
    args: &[&str],
    log: PathBuf,
) -> Binary {
    let port = free_port();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengo-operator"));
    command
        .arg("run")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAMESPACE", OPERATOR_NS)
        .env("POD_NAME", "operator-0")
        .env("TOKENGO_LEASE_NAME", lease)
        .env("TOKENGO_ADMIN_LISTEN", format!("127.0.0.1:{port}"))
        .env("TOKENGO_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("TOKENGO_WATCH_NAMESPACES")
        .env_remove("TOKENGO_APPLY_CRDS")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true);
    Binary { command, port, log }
}

impl Binary {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the binary to its end (within WAIT); its status and log.
    async fn run_to_end(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.command.spawn().unwrap();
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .unwrap_or_else(|_| panic!("the operator did not exit:\n{}", self.log()))
            .unwrap();
        (status, self.log())
    }

    /// Starts it and waits (WAIT at most) until it holds `lease`; fails with its log if it
    /// exits first.
    async fn start_leading(mut self, leases: &Api<Lease>, lease: &str) -> Running {
        let mut child = self.command.spawn().unwrap();
        let name = lease.to_owned();
        let held = wait_for(leases, lease, "held by operator-0", |l: &Lease| {
            l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some("operator-0")
        });
        tokio::select! {
            _ = held => {}
            status = child.wait() => panic!("the operator exited ({status:?}) before leading {name}:\n{}", self.log()),
        }
        Running {
            child,
            binary: self,
        }
    }
}

struct Running {
    child: tokio::process::Child,
    binary: Binary,
}

impl Running {
    /// Stops it with SIGTERM; its status and log.
    async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("no exit on SIGTERM:\n{}", self.binary.log()))
            .unwrap();
        (status, self.binary.log())
    }
}

/// Without the CRDs the binary exits non-zero at once, saying how to install them; with
/// `--apply-crds` it applies them itself (as the chart's ServiceAccount, with only the chart's
/// CRD rules: those two CRDs by name, get and patch), stamped with its version, and leads. An
/// older operator never replaces the CRDs a newer one applied. On a control plane of its own,
/// started without the CRDs.
#[tokio::test]
async fn operator_binary_without_crds_says_what_to_do_or_applies_them() {
    let bare = start_cluster(&[]);
    let root = Client::try_from(config_at(&bare.kubeconfig).await).unwrap();
    grant_chart_rbac(root.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let as_operator = impersonating_kubeconfig(
        &bare.kubeconfig,
        &format!("system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"),
        dir.path(),
    );

    let log = |n: &str| dir.path().join(format!("{n}.log"));
    // No CRDs, not asked to apply them: a clear error, before any election.
    let (status, stderr) = operator_binary(&as_operator, "bare", &["--apply-crds=false"], log("1"))
        .run_to_end()
        .await;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("kubectl apply --server-side -f crds/"),
        "{stderr}"
    );
    assert!(stderr.contains("tokengorelays, tokengoexits"), "{stderr}");
    let leases: Api<Lease> = Api::namespaced(root.clone(), OPERATOR_NS);
    assert!(
        leases.get_opt("bare").await.unwrap().is_none(),
        "it entered the election"
    );

    // Asked to apply them: it does, waits until they are served, and leads.
    let binary = operator_binary(&as_operator, "bare", &["--apply-crds"], log("2"));
    let port = binary.port;
    let running = binary.start_leading(&leases, "bare").await;
    assert!(http_get(port, "/readyz").await.starts_with("HTTP/1.1 200"));
    let crds: Api<CustomResourceDefinition> = Api::all(root.clone());
    for crd in resource::definitions() {
        let applied = crds.get(&crd.name_any()).await.unwrap();
        assert_eq!(
            applied.annotations()[startup::CRD_VERSION_ANNOTATION],
            env!("CARGO_PKG_VERSION")
        );
        // The code's versions and schemas (the API server adds defaults such as the
        // conversion strategy and the list kind).
        assert!(
            applied.spec.versions == crd.spec.versions,
            "{} is not the code's",
            crd.name_any()
        );
    }
    // It reconciles there (the CRDs it applied are watched).
    let ns = namespace(&root, "bare").await;
    let relays: Api<TokenGoRelay> = Api::namespaced(root.clone(), &ns);
    relays
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": "r"}, "spec": {}
        })).unwrap())
        .await
        .unwrap();
    wait_for(&relays, "r", "PeerId", |r: &TokenGoRelay| {
        r.status.as_ref().is_some_and(|s| s.peer_id.is_some())
    })
    .await;
    let (status, stderr) = running.terminate().await;
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("CRD applied"), "{stderr}");

    // A newer operator's CRD (stamped with a higher version) is left as it is.
    let name = resource::definitions()[0].name_any();
    crds.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {startup::CRD_VERSION_ANNOTATION: "999.0.0"}}}),
        ),
    )
    .await
    .unwrap();
    let before = crds.get(&name).await.unwrap().resource_version();
    let (status, stderr) = operator_binary(&as_operator, "bare", &["--apply-crds"], log("3"))
        .start_leading(&leases, "bare")
        .await
        .terminate()
        .await;
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(crds.get(&name).await.unwrap().resource_version(), before);
    assert!(
        stderr.contains("a newer operator applied this CRD"),
        "{stderr}"
    );
}

/// A ServiceAccount without the chart's RBAC: the binary exits non-zero at start, naming what it
/// may not list and how to grant it, instead of running and doing nothing.
#[tokio::test]
async fn operator_binary_without_rbac_says_what_to_do() {
    let client = admin().await;
    install_chart_rbac().await;
    let dir = tempfile::tempdir().unwrap();
    let nobody = impersonating_kubeconfig(
        &cluster().kubeconfig,
        &format!("system:serviceaccount:{OPERATOR_NS}:nobody"),
        dir.path(),
    );
    let lease = format!("norbac-{}", std::process::id());
    let log = |n: &str| dir.path().join(format!("{n}.log"));
    let (status, stderr) = operator_binary(&nobody, &lease, &[], log("1"))
        .run_to_end()
        .await;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("may not list tokengorelays.tokengo.io in all namespaces"),
        "{stderr}"
    );
    assert!(stderr.contains("rbac.create=true"), "{stderr}");
    // With --namespace, the check is made (and fails) in that namespace.
    let (status, stderr) =
        operator_binary(&nobody, &lease, &["--namespace", "somewhere"], log("2"))
            .run_to_end()
            .await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("in namespace somewhere"), "{stderr}");
    assert!(
        Api::<Lease>::namespaced(client, OPERATOR_NS)
            .get_opt(&lease)
            .await
            .unwrap()
            .is_none()
    );
}

/// A ServiceAccount with the chart's rules in one namespace only (a Role, as the chart renders
/// for `watchNamespaces`), and optionally without some verbs on a resource.
async fn namespaced_operator_account(
    name: &str,
    ns: &str,
    drop: Option<(&str, &[&str])>,
) -> Client {
    let client = admin().await;
    let pp = PatchParams::apply("tokengo-tests").force();
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), OPERATOR_NS)
        .patch(name, &pp, &Patch::Apply(&sa))
        .await
        .unwrap();
    let mut rules = chart_rules("operator-rules.yaml");
    if let Some((resource, verbs)) = drop {
        for rule in &mut rules {
            if rule
                .resources
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|r| r == resource)
            {
                rule.verbs.retain(|v| !verbs.contains(&v.as_str()));
            }
        }
    }
    let role = Role {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        rules: Some(rules),
    };
    Api::<Role>::namespaced(client.clone(), ns)
        .patch(name, &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.into(),
            namespace: Some(OPERATOR_NS.into()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(client, ns)
        .patch(name, &pp, &Patch::Apply(&binding))
        .await
        .unwrap();
    let mut config = config().await;
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{OPERATOR_NS}:{name}"));
    Client::try_from(config).unwrap()
}

/// Polls the rendered metrics until `line` is in them (or fails after WAIT).
async fn wait_for_metric(metrics: &Metrics, line: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics.render();
        if text.contains(line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {line} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An operator watching namespace A, with RBAC in A only (a Role, as the chart's
/// `watchNamespaces` renders): it reconciles A's relay and never touches B's, made first.
#[tokio::test]
async fn a_namespace_scoped_operator_leaves_other_namespaces_alone() {
    let client = admin().await;
    let a = namespace(&client, "scoped-a").await;
    let b = namespace(&client, "scoped-b").await;
    let relay = |name: &str| -> TokenGoRelay {
        serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": name}, "spec": {}
        }))
        .unwrap()
    };
    let in_b: Api<TokenGoRelay> = Api::namespaced(client.clone(), &b);
    let in_a: Api<TokenGoRelay> = Api::namespaced(client.clone(), &a);
    in_b.create(&PostParams::default(), &relay("other"))
        .await
        .unwrap();
    let operator_client = namespaced_operator_account("tokengo-scoped", &a, None).await;
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(
        Context::new(operator_client, Settings::default(), metrics.clone(), None)
            .watching(WatchScope::new([a.as_str()]).unwrap()),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(reconcile::run(ctx, stop.clone()));
    in_a.create(&PostParams::default(), &relay("mine"))
        .await
        .unwrap();
    wait_for(&in_a, "mine", "PeerId", |r: &TokenGoRelay| {
        r.status.as_ref().is_some_and(|s| s.peer_id.is_some())
    })
    .await;
    wait_for_metric(
        &metrics,
        r#"tokengo_operator_reconcile_duration_seconds_count{kind="TokenGoRelay"}"#,
    )
    .await;
    stop.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    let text = metrics.render();
    assert!(!text.contains("tokengo_operator_errors_total{"), "{text}");
    assert!(!text.contains(r#"result="error""#), "{text}");
    // B's relay, older than A's, got nothing: no status, no identity Secret.
    assert!(in_b.get("other").await.unwrap().status.is_none());
    assert!(
        Api::<Secret>::namespaced(client, &b)
            .get_opt("other-relay-identity")
            .await
            .unwrap()
            .is_none()
    );
}

/// A real reconcile error (RBAC without `create` on Secrets, so the relay's identity Secret
/// cannot be made) is counted by kind and reason, and retried.
#[tokio::test]
async fn a_forbidden_write_is_counted_as_an_error() {
    let client = admin().await;
    let ns = namespace(&client, "forbidden").await;
    let operator_client =
        namespaced_operator_account("tokengo-nosecrets", &ns, Some(("secrets", &["create"]))).await;
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(
        Context::new(operator_client, Settings::default(), metrics.clone(), None)
            .watching(WatchScope::new([ns.as_str()]).unwrap()),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(reconcile::run(ctx, stop.clone()));
    Api::<TokenGoRelay>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": "nokey"}, "spec": {}
        })).unwrap())
        .await
        .unwrap();
    wait_for_metric(
        &metrics,
        r#"tokengo_operator_errors_total{kind="TokenGoRelay",reason="forbidden"}"#,
    )
    .await;
    stop.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    let text = metrics.render();
    assert!(
        text.contains(
            r#"tokengo_operator_reconciliations_total{kind="TokenGoRelay",result="error"}"#
        ),
        "{text}"
    );
    assert!(
        !text.contains("watch_forbidden"),
        "the watches themselves were allowed: {text}"
    );
}

/// A TokenGoExit or TokenGoRelay from its name and spec.
fn exit_named(name: &str, spec: serde_json::Value) -> TokenGoExit {
    serde_json::from_value(json!({
        "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoExit", "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap()
}

fn relay_named(name: &str, spec: serde_json::Value) -> TokenGoRelay {
    serde_json::from_value(json!({
        "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap()
}

/// An exit spec with a fixed relay address (no TokenGoRelay needed).
fn direct_exit(extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "backend": {"url": "http://backend:8000"},
        "relay": {"addresses": ["/ip4/198.51.100.2/udp/4433/quic-v1/p2p/12D3KooWB"]}
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    spec
}

fn peer_ids(exit: &TokenGoExit) -> Vec<String> {
    exit.status
        .as_ref()
        .map(|s| s.identities.iter().map(|i| i.peer_id.clone()).collect())
        .unwrap_or_default()
}

fn has_event(events: &[Event], reason: &str, type_: &str) -> bool {
    events
        .iter()
        .any(|e| e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some(type_))
}

async fn events_of(client: &Client, ns: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

/// Identities are retained by default: deleting a relay and an exit garbage-collects their
/// workloads but leaves their key Secrets (without owners), and re-creating them with the same
/// names brings back the same PeerIds. With `retainIdentity: false` the Secrets get the
/// resources as owners and go with them.
#[tokio::test]
async fn identities_outlive_their_resources_unless_told_otherwise() {
    let client = admin().await;
    let ns = namespace(&client, "retain").await;
    let relays: Api<TokenGoRelay> = Api::namespaced(client.clone(), &ns);
    let exits: Api<TokenGoExit> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let operator = start_operator().await;
    let create = || async {
        relays
            .create(&PostParams::default(), &relay_named("keep", json!({})))
            .await
            .unwrap();
        exits
            .create(
                &PostParams::default(),
                &exit_named("keep", direct_exit(json!({"replicas": 2}))),
            )
            .await
            .unwrap();
        let relay = wait_for(&relays, "keep", "a PeerId", |r: &TokenGoRelay| {
            r.status.as_ref().is_some_and(|s| s.peer_id.is_some())
        })
        .await;
        let exit = wait_for(&exits, "keep", "two identities", |e: &TokenGoExit| {
            peer_ids(e).len() == 2
        })
        .await;
        (relay, exit)
    };
    let (relay, exit) = create().await;
    let relay_peer = relay.status.unwrap().peer_id.unwrap();
    let exit_peers = peer_ids(&exit);

    relays
        .delete("keep", &DeleteParams::default())
        .await
        .unwrap();
    exits
        .delete("keep", &DeleteParams::default())
        .await
        .unwrap();
    wait_deleted(&deployments, "keep-relay").await;
    wait_deleted(&sets, "keep-exit").await;
    for name in ["keep-relay-identity", "keep-exit-keys"] {
        let secret = secrets
            .get_opt(name)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name} went with its resource"));
        assert!(secret.owner_references().is_empty(), "{name}");
    }

    // Re-created with the same names: the same PeerIds, which clients and exits pinned.
    let (relay, exit) = create().await;
    assert_eq!(relay.status.clone().unwrap().peer_id.unwrap(), relay_peer);
    assert_eq!(peer_ids(&exit), exit_peers);
    let events = events_of(&client, &ns).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("IdentityCreated"))
            .count(),
        1,
        "the relay identity was created once"
    );

    // Not retained: the resources own their Secrets, and the GC deletes them with them.
    let pp = PatchParams::default();
    let off = Patch::Merge(json!({"spec": {"retainIdentity": false}}));
    relays.patch("keep", &pp, &off).await.unwrap();
    exits.patch("keep", &pp, &off).await.unwrap();
    for (name, uid) in [
        ("keep-relay-identity", relay.uid().unwrap()),
        ("keep-exit-keys", exit.uid().unwrap()),
    ] {
        wait_for(&secrets, name, "owned", move |s: &Secret| {
            s.owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .await;
    }
    relays
        .delete("keep", &DeleteParams::default())
        .await
        .unwrap();
    exits
        .delete("keep", &DeleteParams::default())
        .await
        .unwrap();
    wait_deleted(&secrets, "keep-relay-identity").await;
    wait_deleted(&secrets, "keep-exit-keys").await;
    operator.stop_without_errors().await;
}

/// An exit with 3 replicas is a StatefulSet (pods in parallel, rolling updates) whose pods each
/// have an identity of their own, all listed in status. Scaling down keeps the identities and
/// rolls no pod; scaling back up brings the same PeerIds back.
#[tokio::test]
async fn exit_replicas_are_a_stateful_set_with_an_identity_each() {
    let client = admin().await;
    let ns = namespace(&client, "replicas").await;
    let exits: Api<TokenGoExit> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let operator = start_operator().await;
    exits
        .create(
            &PostParams::default(),
            &exit_named("many", direct_exit(json!({"replicas": 3}))),
        )
        .await
        .unwrap();
    let exit = wait_for(&exits, "many", "three identities", |e: &TokenGoExit| {
        peer_ids(e).len() == 3
    })
    .await;
    let status = exit.status.clone().unwrap();
    let peers = peer_ids(&exit);
    assert_eq!(
        peers
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "distinct PeerIds: {peers:?}"
    );
    assert_eq!(
        status.peer_id.as_ref(),
        Some(&peers[0]),
        "peerId is replica 0's"
    );
    assert_eq!(
        status
            .identities
            .iter()
            .map(|i| i.ordinal)
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(status.identities.iter().all(|i| i.keys.len() == 1));

    let set = sets.get("many-exit").await.unwrap();
    let spec = set.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(
        spec.update_strategy.and_then(|u| u.type_).as_deref(),
        Some("RollingUpdate")
    );
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    let args = container.args.clone().unwrap();
    assert!(
        args.windows(2)
            .any(|w| w == ["--keys-dir", "/etc/tokengo/keys/$(POD_NAME)"]),
        "{args:?}"
    );
    // The Secret holds each replica's identity, under the ordinal the pod of that name reads.
    let secret = secrets.get("many-exit-keys").await.unwrap();
    let data = secret.data.clone().unwrap();
    assert_eq!(data.len(), 6);
    for (i, peer) in peers.iter().enumerate() {
        let key = &data[&format!("{i}.exit_identity.key")];
        assert_eq!(&keys::peer_id(&key.0).unwrap().to_string(), peer);
    }
    mark_set_rolled_out(&client, &ns, "many-exit").await;
    wait_for(&exits, "many", "Available", |e: &TokenGoExit| {
        e.status.as_ref().and_then(|s| ready(&s.conditions)) == Some(("True", "Available"))
    })
    .await;

    // Scale to 1: one identity listed, all three kept, the pod template unchanged.
    let template = spec.template;
    let pp = PatchParams::default();
    exits
        .patch("many", &pp, &Patch::Merge(json!({"spec": {"replicas": 1}})))
        .await
        .unwrap();
    wait_for(&exits, "many", "one identity", |e: &TokenGoExit| {
        peer_ids(e).len() == 1
    })
    .await;
    let set = sets.get("many-exit").await.unwrap();
    assert_eq!(set.spec.as_ref().unwrap().replicas, Some(1));
    assert_eq!(set.spec.unwrap().template, template, "scaling rolls no pod");
    let kept = secrets.get("many-exit-keys").await.unwrap();
    assert_eq!(
        kept.data.unwrap(),
        data,
        "scaling down keeps every identity"
    );
    // And back to 3: the same PeerIds.
    exits
        .patch("many", &pp, &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .unwrap();
    let back = wait_for(
        &exits,
        "many",
        "three identities again",
        |e: &TokenGoExit| peer_ids(e).len() == 3,
    )
    .await;
    assert_eq!(peer_ids(&back), peers);
    operator.stop_without_errors().await;
}

/// A relay with 3 replicas: rolling updates that never lose a pod, a headless Service naming
/// every pod (which exits naming the relay are given), and, on this API server (1.20, which
/// does not serve policy/v1), no PodDisruptionBudget: a Warning event, no error, and Ready
/// anyway.
#[tokio::test]
async fn relay_replicas_scale_out_without_a_budget_on_1_20() {
    let client = admin().await;
    let ns = namespace(&client, "wide").await;
    match client.list_api_group_resources("policy/v1").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404, "{status:?}"),
        other => panic!("this tier's API server serves policy/v1 after all: {other:?}"),
    }
    let relays: Api<TokenGoRelay> = Api::namespaced(client.clone(), &ns);
    let exits: Api<TokenGoExit> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let operator = start_operator().await;
    relays
        .create(
            &PostParams::default(),
            &relay_named("wide", json!({"replicas": 3})),
        )
        .await
        .unwrap();
    let relay = wait_for(&relays, "wide", "a PeerId", |r: &TokenGoRelay| {
        r.status.as_ref().is_some_and(|s| s.peer_id.is_some())
    })
    .await;
    let peer = relay.status.unwrap().peer_id.unwrap();
    let deployment = deployments.get("wide-relay").await.unwrap();
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let strategy = spec.strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap();
    assert_eq!(
        (rolling.max_surge, rolling.max_unavailable),
        (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
    );
    let headless = services.get("wide-relay-pods").await.unwrap().spec.unwrap();
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    assert_eq!(headless.selector, spec.selector.match_labels);
    let port = &headless.ports.unwrap()[0];
    assert_eq!((port.port, port.protocol.as_deref()), (4433, Some("UDP")));
    assert!(
        has_event(
            &events_of(&client, &ns).await,
            "PodDisruptionBudgetUnsupported",
            "Warning"
        ),
        "no warning that the relay goes without a disruption budget"
    );
    mark_rolled_out(&client, &ns, "wide-relay").await;
    let ready_relay = wait_for(&relays, "wide", "Ready=True", |r: &TokenGoRelay| {
        r.status.as_ref().and_then(|s| ready(&s.conditions)) == Some(("True", "Available"))
    })
    .await;
    let message = &ready_relay.status.unwrap().conditions[0].message;
    assert!(message.contains("no PodDisruptionBudget"), "{message}");

    // An exit naming the relay registers with every pod: it is given the headless name.
    exits
        .create(
            &PostParams::default(),
            &exit_named(
                "near",
                json!({"backend": {"url": "http://backend:8000"}, "relay": {"name": "wide"}}),
            ),
        )
        .await
        .unwrap();
    let exit = wait_for(&exits, "near", "its relays", |e: &TokenGoExit| {
        e.status.as_ref().is_some_and(|s| !s.relays.is_empty())
    })
    .await;
    assert_eq!(
        exit.status.unwrap().relays,
        [format!(
            "/dns4/wide-relay-pods.{ns}.svc.cluster.local/udp/4433/quic-v1/p2p/{peer}"
        )]
    );
    // Going without a budget is no error.
    operator.stop_without_errors().await;
}

/// Rotating a 3-replica exit rotates every replica's keyring in the Secret (identities
/// unchanged, the previous key kept) and leaves the StatefulSet alone: the pods follow their
/// keyring in the mounted Secret (the node's key follower), so no pod restarts and the exit
/// stays Available throughout.
#[tokio::test]
async fn rotation_rotates_every_replica_and_rolls_no_pod() {
    let client = admin().await;
    let ns = namespace(&client, "rotate").await;
    let exits: Api<TokenGoExit> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let operator = start_operator().await;
    exits
        .create(
            &PostParams::default(),
            &exit_named("spin", direct_exit(json!({"replicas": 3}))),
        )
        .await
        .unwrap();
    wait_for(&exits, "spin", "three identities", |e: &TokenGoExit| {
        peer_ids(e).len() == 3
    })
    .await;
    mark_set_rolled_out(&client, &ns, "spin-exit").await;
    wait_for(&exits, "spin", "Available", |e: &TokenGoExit| {
        e.status.as_ref().and_then(|s| ready(&s.conditions)) == Some(("True", "Available"))
    })
    .await;
    let before = secrets.get("spin-exit-keys").await.unwrap().data.unwrap();
    let hash_before = set_template_hash(&sets, "spin-exit").await;
    let generation_before = sets.get("spin-exit").await.unwrap().metadata.generation;

    exits
        .patch(
            "spin",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {exit_manifest::ROTATE_ANNOTATION: "r1"}}}),
            ),
        )
        .await
        .unwrap();
    let rotated = wait_for(
        &exits,
        "spin",
        "every replica rotated",
        |e: &TokenGoExit| {
            e.status.as_ref().is_some_and(|s| {
                s.identities.len() == 3 && s.identities.iter().all(|i| i.keys.len() == 2)
            })
        },
    )
    .await;
    let after = secrets.get("spin-exit-keys").await.unwrap().data.unwrap();
    for ordinal in 0..3 {
        let identity = format!("{ordinal}.exit_identity.key");
        let keyring = format!("{ordinal}.ohttp_keys.json");
        assert_eq!(
            after[&identity], before[&identity],
            "replica {ordinal}'s identity"
        );
        assert_ne!(
            after[&keyring], before[&keyring],
            "replica {ordinal} not rotated"
        );
        let old = Keyring::parse(&before[&keyring].0).unwrap().public_keys();
        let new = Keyring::parse(&after[&keyring].0).unwrap().public_keys();
        assert_eq!(new.len(), 2);
        assert_eq!(new[1], old[0], "replica {ordinal} keeps its previous key");
        let published = &rotated.status.as_ref().unwrap().identities[ordinal];
        assert_eq!(
            published.keys[0].config,
            hex::encode(new[0].config.encode())
        );
    }
    // The status showing the rotated keys is written by the pass that rotated them, after
    // that pass applied the StatefulSet: by now the set holds what the rotation made of it.
    assert_eq!(
        ready(&rotated.status.as_ref().unwrap().conditions),
        Some(("True", "Available")),
        "the exit stays Available: nothing rolls"
    );
    let set = sets.get("spin-exit").await.unwrap();
    assert_eq!(
        set.metadata.generation, generation_before,
        "the StatefulSet was not changed: no pod rolls"
    );
    assert_eq!(set_template_hash(&sets, "spin-exit").await, hash_before);
    operator.stop_without_errors().await;
}

/// An exit Deployment an earlier operator version made (one identity for every pod) is deleted
/// in the foreground when the StatefulSet is applied, and the StatefulSet comes only once it is
/// gone; the old single identity becomes replica 0's, so clients pinned to it keep working.
#[tokio::test]
async fn an_earlier_versions_exit_deployment_is_replaced() {
    let client = admin().await;
    let ns = namespace(&client, "migrate").await;
    let exits: Api<TokenGoExit> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    // What the earlier version left: the exit, its owned key Secret with one identity, and its
    // owned Deployment (made here while no operator runs).
    let exit = exits
        .create(
            &PostParams::default(),
            &exit_named("old", direct_exit(json!({}))),
        )
        .await
        .unwrap();
    let owner = json!([{
        "apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoExit", "name": "old",
        "uid": exit.uid().unwrap(), "controller": true
    }]);
    let labels = json!({
        "app.kubernetes.io/name": "tokengo-exit", "app.kubernetes.io/instance": "old",
        "app.kubernetes.io/component": "exit", "app.kubernetes.io/managed-by": "tokengo-operator"
    });
    let identity = keys::new_identity().unwrap();
    let now = k8s_openapi::jiff::Timestamp::now()
        .as_second()
        .unsigned_abs();
    let ring = Keyring::generate(1, now).unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "old-exit-keys", "labels": labels, "ownerReferences": owner},
        "type": "Opaque"
    }))
    .unwrap();
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                data: Some(BTreeMap::from([
                    (EXIT_IDENTITY_FILE.to_owned(), ByteString(identity.to_vec())),
                    (
                        EXIT_KEYRING_FILE.to_owned(),
                        ByteString(ring.encode().to_vec()),
                    ),
                ])),
                ..secret
            },
        )
        .await
        .unwrap();
    let old: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "old-exit", "labels": labels, "ownerReferences": owner},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "tokengo-exit", "app.kubernetes.io/instance": "old"}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "exit", "image": "tokengo/node:0.0.9", "args": ["exit"]}]}
            }
        }
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &old)
        .await
        .unwrap();

    let operator = start_operator().await;
    wait_for(&sets, "old-exit", "the StatefulSet", |_: &StatefulSet| true).await;
    assert!(
        deployments.get_opt("old-exit").await.unwrap().is_none(),
        "the StatefulSet came while the old Deployment was still there"
    );
    let exit = wait_for(&exits, "old", "a PeerId", |e: &TokenGoExit| {
        e.status.as_ref().is_some_and(|s| s.peer_id.is_some())
    })
    .await;
    assert_eq!(
        exit.status.unwrap().peer_id.unwrap(),
        keys::peer_id(&identity).unwrap().to_string(),
        "the old identity is replica 0's"
    );
    let secret = secrets.get("old-exit-keys").await.unwrap();
    assert_eq!(
        secret.data.as_ref().unwrap()["0.exit_identity.key"].0,
        *identity
    );
    assert!(
        secret.owner_references().is_empty(),
        "kept from now on (retainIdentity defaults to true)"
    );
    assert!(has_event(
        &events_of(&client, &ns).await,
        "DeploymentReplaced",
        "Normal"
    ));
    operator.stop_without_errors().await;
}

/// Without externalAddress, a LoadBalancer relay takes the load balancer's address once it has
/// one (in status.addresses, and as the address it announces, which rolls its pods); a NodePort
/// relay publishes the node port Kubernetes allocated, and one that would announce other ports
/// than its node ports is not Ready, with a reason saying what to set, until they match.
#[tokio::test]
async fn external_addresses_come_from_the_service() {
    let client = admin().await;
    let ns = namespace(&client, "expose").await;
    let relays: Api<TokenGoRelay> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let operator = start_operator().await;
    let reason = |r: &TokenGoRelay| {
        r.status
            .as_ref()
            .and_then(|s| ready(&s.conditions))
            .map(|(_, reason)| reason.to_owned())
    };
    let external_env = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers[0].env.as_ref())
            .and_then(|env| {
                env.iter()
                    .find(|e| e.name == "TOKENGO_EXTERNAL_ADDRS")
                    .and_then(|e| e.value.clone())
            })
    };

    // --- LoadBalancer: nothing to announce until the load balancer has an address.
    relays
        .create(
            &PostParams::default(),
            &relay_named(
                "lb",
                json!({"service": {"type": "LoadBalancer"}, "dht": {"announce": true}}),
            ),
        )
        .await
        .unwrap();
    let waiting = wait_for(
        &relays,
        "lb",
        "NoExternalAddress",
        move |r: &TokenGoRelay| reason(r).as_deref() == Some("NoExternalAddress"),
    )
    .await;
    let status = waiting.status.unwrap();
    assert!(status.conditions[0].message.contains("no address yet"));
    assert_eq!(status.addresses.len(), 1);
    let peer = status.peer_id.unwrap();
    assert_eq!(
        external_env(&deployments.get("lb-relay").await.unwrap()),
        None
    );
    // The cloud's controller (absent here) gives the load balancer its address.
    services
        .patch_status(
            "lb-relay",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.20"}]}}}),
            ),
        )
        .await
        .unwrap();
    let found = wait_for(
        &relays,
        "lb",
        "the load balancer's address",
        |r: &TokenGoRelay| r.status.as_ref().is_some_and(|s| s.addresses.len() == 2),
    )
    .await;
    assert_eq!(
        found.status.unwrap().addresses[1],
        format!("/ip4/198.51.100.20/udp/4433/quic-v1/p2p/{peer}")
    );
    let d = wait_for(
        &deployments,
        "lb-relay",
        "announces it",
        move |d: &Deployment| external_env(d).is_some(),
    )
    .await;
    assert_eq!(
        external_env(&d).as_deref(),
        Some("/ip4/198.51.100.20/udp/4001/quic-v1")
    );
    mark_rolled_out(&client, &ns, "lb-relay").await;
    wait_for(&relays, "lb", "Available", move |r: &TokenGoRelay| {
        reason(r).as_deref() == Some("Available")
    })
    .await;

    // --- NodePort: the allocated node port is published.
    relays
        .create(
            &PostParams::default(),
            &relay_named(
                "np",
                json!({"service": {"type": "NodePort"}, "externalAddress": "203.0.113.7"}),
            ),
        )
        .await
        .unwrap();
    let np = wait_for(&relays, "np", "an external address", |r: &TokenGoRelay| {
        r.status.as_ref().is_some_and(|s| s.addresses.len() == 2)
    })
    .await;
    let allocated = services
        .get("np-relay")
        .await
        .unwrap()
        .spec
        .unwrap()
        .ports
        .unwrap()[0]
        .node_port
        .unwrap();
    let np_peer = np.status.as_ref().unwrap().peer_id.clone().unwrap();
    assert_eq!(
        np.status.unwrap().addresses[1],
        format!("/ip4/203.0.113.7/udp/{allocated}/quic-v1/p2p/{np_peer}")
    );
    // Announcing its container ports behind other node ports: not Ready, nothing announced.
    let pp = PatchParams::default();
    relays
        .patch(
            "np",
            &pp,
            &Patch::Merge(json!({"spec": {"dht": {"announce": true}}})),
        )
        .await
        .unwrap();
    let differ = wait_for(&relays, "np", "NodePortsDiffer", move |r: &TokenGoRelay| {
        reason(r).as_deref() == Some("NodePortsDiffer")
    })
    .await;
    let message = &differ.status.unwrap().conditions[0].message;
    assert!(
        message.contains(&format!("node ports {allocated} and"))
            && message.contains("service.nodePort"),
        "{message}"
    );
    assert_eq!(
        external_env(&deployments.get("np-relay").await.unwrap()),
        None
    );
    assert!(has_event(
        &events_of(&client, &ns).await,
        "NodePortsDiffer",
        "Warning"
    ));
    mark_rolled_out(&client, &ns, "np-relay").await;
    let still = wait_for(&relays, "np", "its pods ready", |r: &TokenGoRelay| {
        r.status.as_ref().is_some_and(|s| s.ready_replicas == 1)
    })
    .await;
    assert_eq!(
        reason(&still).as_deref(),
        Some("NodePortsDiffer"),
        "never Available so"
    );
    // The ports as the message says: node ports equal to the ports the node announces.
    relays
        .patch(
            "np",
            &pp,
            &Patch::Merge(
                json!({"spec": {"port": 30533, "dhtPort": 30534, "service": {"nodePort": 30533}}}),
            ),
        )
        .await
        .unwrap();
    let d = wait_for(
        &deployments,
        "np-relay",
        "announces the node ports",
        move |d: &Deployment| external_env(d).is_some(),
    )
    .await;
    assert_eq!(
        external_env(&d).as_deref(),
        Some("/ip4/203.0.113.7/udp/30534/quic-v1")
    );
    let ports = services
        .get("np-relay")
        .await
        .unwrap()
        .spec
        .unwrap()
        .ports
        .unwrap();
    let node_ports: Vec<(i32, Option<i32>)> = ports.iter().map(|p| (p.port, p.node_port)).collect();
    assert_eq!(node_ports, [(30533, Some(30533)), (30534, Some(30534))]);
    mark_rolled_out(&client, &ns, "np-relay").await;
    let matched = wait_for(&relays, "np", "Available", move |r: &TokenGoRelay| {
        reason(r).as_deref() == Some("Available")
    })
    .await;
    assert_eq!(
        matched.status.unwrap().addresses[1],
        format!("/ip4/203.0.113.7/udp/30533/quic-v1/p2p/{np_peer}")
    );
    operator.stop_without_errors().await;
}
