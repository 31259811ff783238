"""The one-node cluster runs the project's images as pods: a relay Deployment from the node
image becomes Ready, `kubectl logs` works through the kubelet, a `tokengo client` on the host
reaches the relay pod through its UDP NodePort on loopback (and gets the relay's "no exit"
answer), and the cluster DNS names Services the way the operator's exits need them.
"""

from __future__ import annotations

import json
import random
import re
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.k8s.conftest import Cluster, binary
from tests.k8s.test_images import free_port, read_line_matching

from .conftest import TIMINGS

NS = "smoke"


def relay_objects(image: str) -> list[dict]:
    labels = {"app": "smoke-relay"}
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": {"fsGroup": 65532},
            "containers": [{
                "name": "relay", "image": image, "imagePullPolicy": "Never",
                "args": ["relay", "--data-dir", "/data"],
                "env": [{"name": "TOKENGO_ADMIN_LISTEN", "value": "0.0.0.0:9090"}],
                "ports": [{"name": "quic", "containerPort": 4433, "protocol": "UDP"},
                          {"name": "admin", "containerPort": 9090}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"}, "periodSeconds": 1},
                "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }
    udp = [{"name": "quic", "port": 4433, "targetPort": "quic", "protocol": "UDP"}]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "smoke-relay", "namespace": NS},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": pod}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "smoke-relay", "namespace": NS},
         "spec": {"type": "NodePort", "selector": labels, "ports": udp}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "smoke-relay-pods", "namespace": NS},
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels, "ports": udp}},
    ]


@pytest.fixture(scope="module")
def relay(node_cluster: Cluster, node_images: dict[str, str]) -> Iterator[dict]:
    started = time.monotonic()
    for doc in relay_objects(node_images["node"]):
        node_cluster.apply(doc)
    node_cluster.wait_for("Deployment", NS, "smoke-relay", "one available replica",
                          lambda d: (d.get("status") or {}).get("availableReplicas") == 1, timeout=120)
    TIMINGS["relay pod Ready (apply to Available)"] = round(time.monotonic() - started, 1)
    pods = node_cluster.request("GET", f"/api/v1/namespaces/{NS}/pods?labelSelector=app%3Dsmoke-relay")["items"]
    assert len(pods) == 1, pods
    yield pods[0]
    node_cluster.request("DELETE", f"/api/v1/namespaces/{NS}")


def test_a_relay_pod_from_the_local_image_becomes_ready_on_the_node(node_cluster: Cluster, relay: dict) -> None:
    node = node_cluster.get("Node", None, "tokengo-node")
    assert node is not None
    internal = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
    assert internal and not internal[0].startswith("127."), node["status"]["addresses"]
    assert relay["status"]["hostIP"] == internal[0]
    assert relay["status"]["podIP"] != internal[0]
    ready = [c for c in relay["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", relay["status"]


def pod_log(cluster: Cluster, pod: dict) -> str:
    """The container's log through the API server and the kubelet (what `kubectl logs` does)."""
    req = urllib.request.Request(f"{cluster.url}/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/log")
    req.add_header("Authorization", f"Bearer {cluster.token}")
    with urllib.request.urlopen(req, context=cluster.tls, timeout=30) as resp:
        return resp.read().decode()


def wait_node_port_programmed(node_port: int, pod_ip: str, timeout: float = 30) -> None:
    """Polls the nat table until the NodePort jumps to a Service chain and a DNAT to the pod exists."""
    deadline = time.monotonic() + timeout
    while True:
        rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout
        if re.search(rf"-A KUBE-NODEPORTS .*--dport {node_port} -j KUBE-SVC-", rules) and f"--to-destination {pod_ip}:" in rules:
            return
        assert time.monotonic() < deadline, f"kube-proxy did not program NodePort {node_port} -> {pod_ip} in {timeout} s"
        time.sleep(0.2)


def test_a_host_client_reaches_the_relay_pod_through_its_node_port(node_cluster: Cluster, relay: dict) -> None:
    match = re.search(r"relay listening on \S+/p2p/(\w+)", pod_log(node_cluster, relay))
    assert match, "the relay pod's log has no listening line"
    service = node_cluster.get("Service", NS, "smoke-relay")
    node_port = service["spec"]["ports"][0]["nodePort"]
    # The first UDP packet to a NodePort kube-proxy has not programmed yet leaves a conntrack
    # entry without the DNAT, which the client's later packets keep using (kube-proxy 1.20
    # clears UDP entries when endpoints appear, not when a late packet made one): so the
    # client starts once the rules send the port to the pod.
    wait_node_port_programmed(node_port, relay["status"]["podIP"])
    port = free_port()
    proc = subprocess.Popen([str(binary("TOKENGO_BIN")), "client", "--relay",
                             f"/ip4/127.0.0.1/udp/{node_port}/quic-v1/p2p/{match.group(1)}",
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        read_line_matching(proc.stdout, r"client listening on", time.monotonic() + 30)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        # The relay pod answered (it proved its PeerId over QUIC) and has no exit yet.
        assert answer.value.code == 503, answer.value.read()
        assert json.loads(answer.value.read())["error"]["code"] == "no_exit_available"
    finally:
        proc.kill()
        _, err = proc.communicate()
        print(f"client stderr (last lines): {err[-1500:]}")


def resolve(server: str, name: str) -> tuple[int, list[str]]:
    """One DNS A query over UDP: (response code, addresses)."""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question, (server, 53))
        data, _ = s.recvfrom(4096)
    rid, flags, _, ancount, _, _ = struct.unpack(">HHHHHH", data[:12])
    assert rid == qid
    pos = 12 + len(question)
    out = []
    for _ in range(ancount):
        pos += 2 if data[pos] & 0xC0 == 0xC0 else len(name) + 2  # compressed or literal name
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[pos:pos + 10])
        pos += 10
        if rtype == 1:
            out.append(socket.inet_ntoa(data[pos:pos + rdlen]))
        pos += rdlen
    return flags & 0xF, sorted(out)


def wait_resolves(server: str, name: str, want: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = resolve(server, name)
        if got == (0, want):
            return
        assert time.monotonic() < deadline, f"{name} resolves to {got}, want {want}"
        time.sleep(0.2)


def test_cluster_dns_names_services_and_nothing_else(node_cluster: Cluster, relay: dict) -> None:
    node_ip = relay["status"]["hostIP"]
    # Headless: every pod (what the operator gives in-cluster exits); ClusterIP: the Service.
    wait_resolves(node_ip, f"smoke-relay-pods.{NS}.svc.cluster.local", [relay["status"]["podIP"]])
    cluster_ip = node_cluster.get("Service", NS, "smoke-relay")["spec"]["clusterIP"]
    wait_resolves(node_ip, f"smoke-relay.{NS}.svc.cluster.local", [cluster_ip])
    wait_resolves(node_ip, "kubernetes.default.svc.cluster.local", ["10.96.0.1"])
    # No upstream: other names get no address (the resolver never asks anyone else).
    code, addresses = resolve(node_ip, "example.org")
    assert addresses == [] and code != 0, (code, addresses)
