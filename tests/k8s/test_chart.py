"""The Helm chart: it renders (Helm v4 SDK), lints clean, its values schema rejects bad values,
its manifests apply server-side to a real API server, `helm install` works there, and the
operator it installs runs with exactly the RBAC it grants."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from .conftest import CHART, REPO, Cluster, binary

NS = "tokengo-system"


def render(values: dict | None = None, name: str = "tokengo", namespace: str = NS) -> dict[str, list[dict]]:
    """Rendered objects by kind (Helm renders templates/; crds/ are installed separately)."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name=name, namespace=namespace)
    by_kind: dict[str, list[dict]] = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def notes(values: dict | None = None) -> str:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values or {}, name="tokengo", namespace=NS)["tokengo/templates/NOTES.txt"]


def test_lint_is_clean() -> None:
    result = helm.lint(str(CHART))
    assert result["errors"] == [], result
    # Severity 1 is INFO (e.g. "icon is recommended"); nothing at WARNING (2) or ERROR (3).
    assert all(m["severity"] <= 1 for m in result["messages"]), result


def test_lint_is_clean_with_every_option_on() -> None:
    values = {
        "replicas": 2,
        "imagePullSecrets": [{"name": "regcred"}],
        "watchNamespaces": ["team-a"],
        "podDisruptionBudget": {"enabled": True},
        "metrics": {"service": {"enabled": True}, "serviceMonitor": {"enabled": True}},
        "networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}},
        "relay": {"enabled": True},
    }
    result = helm.lint(str(CHART), values)
    assert result["errors"] == [], result
    assert all(m["severity"] <= 1 for m in result["messages"]), result


def test_default_render_is_the_operator_locked_down() -> None:
    objects = render()
    assert sorted(objects) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "ServiceAccount"]
    deployment = objects["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tokengo"
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/tokengo/tokengo-operator:0.1.0"
    assert "imagePullSecrets" not in pod
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TOKENGO_NODE_IMAGE"] == "ghcr.io/tokengo/tokengo-node:0.1.0"
    assert env["TOKENGO_NODE_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert env["TOKENGO_APPLY_CRDS"] == "true"
    assert (env["TOKENGO_LEASE_DURATION"], env["TOKENGO_LEASE_RENEW_DEADLINE"], env["TOKENGO_LEASE_RETRY_PERIOD"]) == ("15", "10", "2")
    assert "TOKENGO_WATCH_NAMESPACES" not in env and "TOKENGO_IMAGE_PULL_SECRETS" not in env
    assert env["TOKENGO_ADMIN_LISTEN"] == "0.0.0.0:8081"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def rules_file(name: str) -> list[dict]:
    return yaml.safe_load((CHART / "files" / name).read_text())


def by_name(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects}


def test_rbac_is_exactly_the_rules_files() -> None:
    objects = render()
    rules = rules_file("operator-rules.yaml")
    lease_rules = rules_file("lease-rules.yaml")
    crd_rules = rules_file("crd-rules.yaml")
    roles = by_name(objects["ClusterRole"])
    assert roles.keys() == {f"{NS}-tokengo", f"{NS}-tokengo-crds"}
    assert roles[f"{NS}-tokengo"]["rules"] == rules
    assert roles[f"{NS}-tokengo-crds"]["rules"] == crd_rules
    assert objects["Role"][0]["rules"] == lease_rules
    # Least privilege: no wildcards, nothing beyond the operator's own kinds, and delete only
    # for what the operator replaces (an old exit Deployment, a relay's PodDisruptionBudget
    # it no longer needs): never Secrets, which hold keys.
    for rule in rules + lease_rules + crd_rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        if "delete" in rule["verbs"]:
            assert rule["resources"] in (["deployments"], ["poddisruptionbudgets"]), rule
    # CRDs: only TokenGo's two, by name.
    for rule in crd_rules:
        assert rule["resourceNames"] == ["tokengorelays.tokengo.io", "tokengoexits.tokengo.io"], rule
    for binding in objects["ClusterRoleBinding"]:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tokengo", "namespace": NS}]
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
    # Without applyCrds, no CRD permissions at all.
    off = render({"applyCrds": False})
    assert [r["metadata"]["name"] for r in off["ClusterRole"]] == [f"{NS}-tokengo"]
    env = {e["name"]: e.get("value") for e in off["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOKENGO_APPLY_CRDS"] == "false"


def test_two_releases_in_two_namespaces_get_distinct_cluster_scoped_names() -> None:
    first = render(name="tokengo", namespace="team-a")
    second = render(name="tokengo", namespace="team-b")
    for kind in ("ClusterRole", "ClusterRoleBinding"):
        a = set(by_name(first[kind]))
        b = set(by_name(second[kind]))
        assert a and b and not a & b, (kind, a, b)
    for binding in second["ClusterRoleBinding"]:
        assert binding["roleRef"]["name"] in by_name(second["ClusterRole"])
        assert binding["subjects"][0]["namespace"] == "team-b"


def test_watch_namespaces_renders_a_role_in_each_instead_of_the_cluster_role() -> None:
    objects = render({"watchNamespaces": ["team-a", "team-b"]})
    rules = rules_file("operator-rules.yaml")
    # Only the CRD ClusterRole is cluster-wide; the operator rules are Roles in those namespaces.
    assert [r["metadata"]["name"] for r in objects["ClusterRole"]] == [f"{NS}-tokengo-crds"]
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in objects["Role"]}
    assert roles[("team-a", "tokengo")]["rules"] == rules
    assert roles[("team-b", "tokengo")]["rules"] == rules
    assert roles[(NS, "tokengo-lease")]["rules"] == rules_file("lease-rules.yaml")
    bindings = {(b["metadata"]["namespace"], b["metadata"]["name"]): b for b in objects["RoleBinding"]}
    for ns in ("team-a", "team-b"):
        binding = bindings[(ns, "tokengo")]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tokengo"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tokengo", "namespace": NS}]
    env = {e["name"]: e.get("value") for e in objects["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOKENGO_WATCH_NAMESPACES"] == "team-a,team-b"


def test_image_pull_secrets_reach_the_operator_and_the_node_pods() -> None:
    objects = render({"imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}], "nodeImage": {"repository": "registry.example/tokengo-node", "tag": "x", "pullPolicy": "Always"}})
    pod = objects["Deployment"][0]["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["TOKENGO_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    assert env["TOKENGO_NODE_IMAGE"] == "registry.example/tokengo-node:x"
    assert env["TOKENGO_NODE_IMAGE_PULL_POLICY"] == "Always"


def test_pdb_metrics_and_network_policy_only_when_asked() -> None:
    default = render()
    for kind in ("PodDisruptionBudget", "Service", "ServiceMonitor", "NetworkPolicy"):
        assert kind not in default, kind
    # A PDB with more than one replica, or when enabled.
    for values in ({"replicas": 2}, {"podDisruptionBudget": {"enabled": True}}):
        (pdb,) = render(values)["PodDisruptionBudget"]
        # policy/v1 wherever it is served (Kubernetes 1.21+; the 1.20 API server of the install
        # test gets policy/v1beta1).
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "tokengo-operator", "app.kubernetes.io/instance": "tokengo"}
    # The metrics Service alone, or with a ServiceMonitor (which needs it).
    service_only = render({"metrics": {"service": {"enabled": True}}})
    assert "ServiceMonitor" not in service_only
    (service,) = service_only["Service"]
    assert service["metadata"]["name"] == "tokengo-metrics"
    assert service["spec"]["ports"] == [{"name": "admin", "port": 8081, "targetPort": "admin", "protocol": "TCP"}]
    monitored = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    (monitor,) = monitored["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "admin", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert [s["metadata"]["name"] for s in monitored["Service"]] == ["tokengo-metrics"]


def test_network_policy_admits_the_admin_port_in_and_dns_and_the_api_server_out() -> None:
    (policy,) = render({"networkPolicy": {"enabled": True}})["NetworkPolicy"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [{"ports": [{"port": 8081, "protocol": "TCP"}]}]
    dns, api = spec["egress"]
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert api == {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    (narrow,) = render({"networkPolicy": {"enabled": True, "metricsFrom": [peer], "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [6443]}}})["NetworkPolicy"]
    assert narrow["spec"]["ingress"][0]["from"] == [peer]
    assert narrow["spec"]["egress"][1] == {"ports": [{"port": 6443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}


def test_a_packaged_release_defaults_to_its_own_images(tmp_path: Path) -> None:
    """What the release workflow does: `helm package --version V --app-version V`."""
    archive = helm.package(str(CHART), destination=str(tmp_path), version="1.2.3", app_version="1.2.3")
    assert Path(archive).name == "tokengo-1.2.3.tgz"
    with helm.Chart.load(archive) as chart:
        manifests = chart.render({}, name="tokengo", namespace=NS)
    deployment = next(d for path, text in manifests.items() if not path.endswith("NOTES.txt")
                      for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/tokengo/tokengo-operator:1.2.3"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TOKENGO_NODE_IMAGE"] == "ghcr.io/tokengo/tokengo-node:1.2.3"


def test_relay_and_exit_from_values() -> None:
    objects = render({
        "relay": {"enabled": True, "name": "edge", "spec": {"service": {"type": "LoadBalancer"}}},
        "exit": {"enabled": True, "name": "llm", "spec": {"backend": {"url": "http://ollama:11434"}, "relay": {"name": "edge"}}},
    })
    assert objects["TokenGoRelay"][0]["metadata"]["name"] == "edge"
    assert objects["TokenGoRelay"][0]["spec"] == {"service": {"type": "LoadBalancer"}}
    assert objects["TokenGoExit"][0]["spec"]["relay"] == {"name": "edge"}
    text = notes({"relay": {"enabled": True, "name": "edge"}})
    assert "get tokengorelay edge" in text
    assert "tokengo client --relay" in notes()


@pytest.mark.parametrize(
    "values",
    [
        {"bogus": 1},
        {"replicas": "two"},
        {"replicas": 0},
        {"image": {"repository": "x", "extra": True}},
        {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
        {"relay": {"enabled": "yes"}},
        {"exit": {"enabled": True, "name": "Bad_Name"}},
        {"exit": {"enabled": True, "spec": "not an object"}},
        {"logFormat": "xml"},
        {"serviceAccount": {"create": True, "token": "x"}},
        {"nodeSelector": {"a": 1}},
        {"imagePullSecrets": "regcred"},
        {"imagePullSecrets": ["regcred"]},
        {"imagePullSecrets": [{"name": 5}]},
        {"imagePullSecrets": [{"secret": "regcred"}]},
        {"nodeImage": {"repository": "x", "pullPolicy": "Sometimes"}},
        {"applyCrds": "yes"},
        {"watchNamespaces": "team-a"},
        {"watchNamespaces": ["Team_A"]},
        {"watchNamespaces": ["a", "a"]},
        {"leaderElection": {"leaseDuration": "15s", "renewDeadline": 10, "retryPeriod": 2}},
        {"leaderElection": {"retryPeriod": 0}},
        {"podDisruptionBudget": {"enabled": True, "minAvailable": 1}},
        {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
        {"metrics": {"serviceMonitor": {"interval": "often"}}},
        {"networkPolicy": {"enabled": True, "apiServer": {"ports": []}}},
        {"networkPolicy": {"apiServer": {"cidrs": ["10.0.0.1"]}}},
    ],
)
def test_values_schema_rejects_bad_values(values: dict) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)
        # Rendering with them fails too (what `helm install` would say).
        with pytest.raises(helm.HelmError):
            chart.render(values, name="tokengo", namespace=NS)


def test_good_values_pass_the_schema() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({"replicas": 2, "relay": {"enabled": True, "spec": {"replicas": 1}}, "logFormat": "text"})
        chart.validate_schema({
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeImage": {"repository": "r/node", "pullPolicy": "Never"},
            "watchNamespaces": ["team-a", "team-b"],
            "applyCrds": False,
            "leaderElection": {"leaseDuration": 30, "renewDeadline": 20, "retryPeriod": 2.5},
            "podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"},
            "metrics": {"service": {"enabled": True}, "serviceMonitor": {"enabled": True, "interval": "1m30s"}},
            "networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.96.0.1/32", "fd00::1/128"], "ports": [6443]}},
        })


def test_chart_crds_are_the_committed_crds() -> None:
    for path in sorted((REPO / "crds").glob("*.yaml")):
        assert (CHART / "crds" / path.name).read_text() == path.read_text(), path.name


def test_rendered_manifests_apply_server_side(cluster: Cluster) -> None:
    for crd in sorted((CHART / "crds").glob("*.yaml")):
        doc = yaml.safe_load(crd.read_text())
        cluster.apply(doc)
        cluster.wait_for("CustomResourceDefinition", None, doc["metadata"]["name"], "Established", established)
    ns = "applied"
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    values = {
        "relay": {"enabled": True, "spec": {"service": {"type": "NodePort"}}},
        "exit": {"enabled": True, "spec": {"backend": {"url": "http://ollama:11434"}, "relay": {"name": "relay"}}},
    }
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="applied", namespace=ns)
    applied = []
    docs = [doc for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]
    for doc in docs:
        out = cluster.apply(doc, namespace=ns)
        applied.append(out["kind"])
        assert out["metadata"]["resourceVersion"]
    assert sorted(applied) == sorted(["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount", "Deployment", "TokenGoRelay", "TokenGoExit"])
    # Applying the same manifests again changes nothing.
    for doc in docs:
        name = doc["metadata"]["name"]
        before = cluster.get(doc["kind"], ns, name)
        after = cluster.apply(doc, namespace=ns)
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], (doc["kind"], name)


def established(crd: dict) -> bool:
    conditions = crd.get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def test_helm_install_then_the_operator_runs_with_the_charts_rbac(cluster: Cluster, tmp_path: Path) -> None:
    """`helm install` (Helm's own install action) into the real API server, then the operator
    binary acting as the ServiceAccount the chart made, with only the RBAC the chart granted."""
    values = {
        "relay": {"enabled": True, "name": "edge", "spec": {"service": {"type": "NodePort", "nodePort": 30433}}},
        "exit": {"enabled": True, "name": "llm", "spec": {"backend": {"url": "http://ollama.models.svc:11434"}, "relay": {"name": "edge"}}},
        # The optional objects too, so the API server checks them (a 1.20 one: policy/v1beta1).
        "podDisruptionBudget": {"enabled": True},
        "networkPolicy": {"enabled": True},
        "metrics": {"service": {"enabled": True}},
    }
    with helm.Config(kubeconfig_path=str(cluster.kubeconfig), namespace=NS) as cfg:
        release = cfg.install(str(CHART), "tokengo", values, create_namespace=True, timeout=120)
        assert release["status"] == "deployed"
        assert [r["name"] for r in cfg.list()] == ["tokengo"]
    assert cluster.get("ServiceAccount", NS, "tokengo") is not None

    kubeconfig = yaml.safe_load(cluster.kubeconfig.read_text())
    kubeconfig["users"][0]["user"]["as"] = f"system:serviceaccount:{NS}:tokengo"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    env = dict(os.environ, KUBECONFIG=str(path), POD_NAMESPACE=NS, POD_NAME="tokengo-0",
               TOKENGO_LEASE_NAME="tokengo", TOKENGO_ADMIN_LISTEN="127.0.0.1:0", RUST_LOG="info",
               # As the chart runs it: applying the CRDs Helm installed, with the chart's CRD rules.
               TOKENGO_APPLY_CRDS="true")
    log = (tmp_path / "operator.log").open("w")
    operator = subprocess.Popen([str(binary("TOKENGO_OPERATOR_BIN")), "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        relay = cluster.wait_for("TokenGoRelay", NS, "edge", "a PeerId in status",
                                 lambda r: bool(r.get("status", {}).get("peerId")))
        exit_ = cluster.wait_for("TokenGoExit", NS, "llm", "keys and the relay in status",
                                 lambda e: bool(e.get("status", {}).get("keys")) and bool(e.get("status", {}).get("relays")))
        peer = relay["status"]["peerId"]
        # Exits are given the relay's headless Service (every relay pod) and run as a StatefulSet.
        assert exit_["status"]["relays"] == [f"/dns4/edge-relay-pods.{NS}.svc.cluster.local/udp/4433/quic-v1/p2p/{peer}"]
        assert cluster.get("StatefulSet", NS, "llm-exit") is not None
        assert cluster.get("Secret", NS, "edge-relay-identity") is not None
        service = cluster.get("Service", NS, "edge-relay")
        assert service["spec"]["ports"][0]["nodePort"] == 30433
    finally:
        operator.send_signal(signal.SIGTERM)
        code = operator.wait(timeout=60)
        log.close()
    text = (tmp_path / "operator.log").read_text()
    assert code == 0, text
    assert "forbidden" not in text.lower(), text
    assert "CRD applied" in text, text
    lease = cluster.get("Lease", NS, "tokengo")
    assert lease is not None and not lease["spec"].get("holderIdentity"), lease

    with helm.Config(kubeconfig_path=str(cluster.kubeconfig), namespace=NS) as cfg:
        cfg.uninstall("tokengo", timeout=120)
    assert cluster.get("Deployment", NS, "tokengo") is None
