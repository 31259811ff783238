"""The private path on the one-node cluster: the chart's operator (helm install, local image)
runs a TokenGoRelay (NodePort) and a TokenGoExit whose backend is an in-cluster model server
Deployment's Service; the exit registers with every relay pod through the relay's headless
Service name (the cluster DNS), and a `tokengo client` on the host gets chat completions,
plain and streamed, through the pods, checked with the `openai` SDK.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.k8s.conftest import CHART, Cluster, binary
from tests.k8s.test_images import free_port, read_line_matching

from .conftest import TIMINGS
from .test_node import wait_node_port_programmed

NS = "tokengo"
MODELS = "models"


def ready(obj: dict) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def model_service(node_cluster: Cluster, model_image: str) -> str:
    labels = {"app": "model"}
    node_cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MODELS}})
    node_cluster.apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "model", "namespace": MODELS},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"automountServiceAccountToken": False, "containers": [{
                "name": "model", "image": model_image, "imagePullPolicy": "Never",
                "ports": [{"name": "http", "containerPort": 11434, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
                "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
            }]},
        }},
    })
    node_cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "model", "namespace": MODELS},
                        "spec": {"selector": labels, "ports": [{"name": "http", "port": 11434, "targetPort": "http", "protocol": "TCP"}]}})
    started = time.monotonic()
    node_cluster.wait_for("Deployment", MODELS, "model", "one available replica",
                          lambda d: (d.get("status") or {}).get("availableReplicas") == 1, timeout=300)
    TIMINGS["model pod Ready"] = round(time.monotonic() - started, 1)
    return f"http://model.{MODELS}.svc.cluster.local:11434"


@pytest.fixture(scope="module")
def private_path(node_cluster: Cluster, node_images: dict[str, str], model_service: str) -> Iterator[tuple[dict, dict]]:
    import helm_python as helm

    values = {
        "image": {"repository": node_images["operator"].split(":")[0], "tag": node_images["operator"].split(":")[1], "pullPolicy": "Never"},
        "nodeImage": {"repository": node_images["node"].split(":")[0], "tag": node_images["node"].split(":")[1], "pullPolicy": "Never"},
    }
    started = time.monotonic()
    with helm.Config(kubeconfig_path=str(node_cluster.kubeconfig), namespace=NS) as cfg:
        assert cfg.install(str(CHART), "tokengo", values, create_namespace=True, timeout=120)["status"] == "deployed"
    node_cluster.wait_for("Deployment", NS, "tokengo", "the operator available",
                          lambda d: (d.get("status") or {}).get("availableReplicas") == 1, timeout=120)
    TIMINGS["operator pod Ready after helm install"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    node_cluster.apply({"apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoRelay", "metadata": {"name": "edge", "namespace": NS},
                        "spec": {"replicas": 2, "service": {"type": "NodePort"}, "externalAddress": "127.0.0.1"}})
    node_cluster.apply({"apiVersion": "tokengo.io/v1alpha1", "kind": "TokenGoExit", "metadata": {"name": "llm", "namespace": NS},
                        "spec": {"backend": {"url": model_service}, "relay": {"name": "edge"}}})
    relay = node_cluster.wait_for("TokenGoRelay", NS, "edge", "Ready", ready, timeout=180)
    exit_ = node_cluster.wait_for("TokenGoExit", NS, "llm", "Ready", ready, timeout=180)
    TIMINGS["relay (2 pods) and exit Ready"] = round(time.monotonic() - started, 1)
    yield relay, exit_


def test_a_host_client_gets_answers_through_the_pods(node_cluster: Cluster, private_path: tuple[dict, dict]) -> None:
    import openai

    relay, exit_ = private_path
    peer = exit_["status"]["peerId"]
    address = relay["status"]["addresses"][1]  # the NodePort on 127.0.0.1 (externalAddress)
    assert address.startswith("/ip4/127.0.0.1/udp/"), relay["status"]["addresses"]
    node_port = int(address.split("/")[4])
    service = node_cluster.get("Service", NS, "edge-relay")
    selector = "app.kubernetes.io%2Fname%3Dtokengo-relay%2Capp.kubernetes.io%2Finstance%3Dedge"
    pods = node_cluster.request("GET", f"/api/v1/namespaces/{NS}/pods?labelSelector={selector}")["items"]
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    for pod in pods:
        wait_node_port_programmed(node_port, pod["status"]["podIP"])
    assert service["spec"]["ports"][0]["nodePort"] == node_port
    port = free_port()
    proc = subprocess.Popen([str(binary("TOKENGO_BIN")), "client", "--exit", peer, "--relay", address,
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        read_line_matching(proc.stdout, r"client listening on", time.monotonic() + 60)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        model = api.models.list().data[0].id
        started = time.monotonic()
        answer = api.chat.completions.create(model=model, max_tokens=16,
                                             messages=[{"role": "user", "content": "Say hello."}])
        TIMINGS["first chat completion through the pods"] = round(time.monotonic() - started, 2)
        assert answer.choices[0].message.content, answer
        chunks = list(api.chat.completions.create(model=model, max_tokens=16, stream=True,
                                                  messages=[{"role": "user", "content": "Count to three."}]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 2 and text, chunks
    finally:
        proc.kill()
        _, err = proc.communicate()
        print(f"client stderr (last lines): {err[-1500:]}")
