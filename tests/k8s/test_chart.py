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


def render(values: dict | None = None, name: str = "tokengo") -> dict[str, list[dict]]:
    """Rendered objects by kind (Helm renders templates/; crds/ are installed separately)."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name=name, namespace=NS)
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
    assert container["image"] == "tokengo/operator:0.1.0"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TOKENGO_NODE_IMAGE"] == "tokengo/node:0.1.0"
    assert env["TOKENGO_ADMIN_LISTEN"] == "0.0.0.0:8081"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_rbac_is_exactly_the_rules_files() -> None:
    objects = render()
    rules = yaml.safe_load((CHART / "files" / "operator-rules.yaml").read_text())
    lease_rules = yaml.safe_load((CHART / "files" / "lease-rules.yaml").read_text())
    assert objects["ClusterRole"][0]["rules"] == rules
    assert objects["Role"][0]["rules"] == lease_rules
    # Least privilege: no wildcards, nothing beyond the operator's own kinds, and delete only
    # for what the operator replaces (an old exit Deployment, a relay's PodDisruptionBudget
    # it no longer needs): never Secrets, which hold keys.
    for rule in rules + lease_rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        if "delete" in rule["verbs"]:
            assert rule["resources"] in (["deployments"], ["poddisruptionbudgets"]), rule
    binding = objects["ClusterRoleBinding"][0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tokengo", "namespace": NS}]


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
    assert sorted(applied) == sorted(["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount", "Deployment", "TokenGoRelay", "TokenGoExit"])
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
               TOKENGO_LEASE_NAME="tokengo", TOKENGO_ADMIN_LISTEN="127.0.0.1:0", RUST_LOG="info")
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
    lease = cluster.get("Lease", NS, "tokengo")
    assert lease is not None and not lease["spec"].get("holderIdentity"), lease

    with helm.Config(kubeconfig_path=str(cluster.kubeconfig), namespace=NS) as cfg:
        cfg.uninstall("tokengo", timeout=120)
    assert cluster.get("Deployment", NS, "tokengo") is None
