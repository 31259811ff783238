"""Fixtures for the one-node cluster tier: `scripts/k8s-cluster --node` (API server, controller
manager, scheduler, a kubelet on this machine's Docker engine, kube-proxy, dnsmasq as cluster DNS)
and the project's images built from its Dockerfiles.

Environment:
  TOKENGO_BIN, TOKENGO_OPERATOR_BIN  release binaries (packed into the images; the host client)
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.k8s.conftest import KINDS, REPO, Cluster
from tests.k8s.test_images import NODE, OPERATOR, build

KINDS.setdefault("Pod", ("/api/v1", "pods", True))
KINDS.setdefault("Endpoints", ("/api/v1", "endpoints", True))
KINDS.setdefault("Node", ("/api/v1", "nodes", False))

# How long the cluster took to start (node Ready), for the report.
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A one-node cluster; everything it started is stopped (and the machine's iptables and
    kernel settings restored) when its stdin closes."""
    directory = tmp_path_factory.mktemp("node-cluster")
    started = time.monotonic()
    proc = subprocess.Popen([str(REPO / "scripts" / "k8s-cluster"), "--node", str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        pytest.fail(f"the one-node cluster did not start (scripts/k8s-cluster --node said {line!r}); logs in {directory}")
    TIMINGS["cluster start (node Ready)"] = round(time.monotonic() - started, 1)
    try:
        yield Cluster(directory, line.split()[1])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=120)
        print(f"\nnode tier timings: {TIMINGS}")


@pytest.fixture(scope="session")
def node_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The node and operator images from Dockerfile.node / Dockerfile.operator (local base)."""
    base = subprocess.run([str(REPO / "scripts" / "docker-base")], capture_output=True, text=True, check=True).stdout.strip()
    tmp = tmp_path_factory.mktemp("images")
    build("Dockerfile.node", NODE, "tokengo", "TOKENGO_BIN", base, tmp)
    build("Dockerfile.operator", OPERATOR, "tokengo-operator", "TOKENGO_OPERATOR_BIN", base, tmp)
    return {"node": NODE, "operator": OPERATOR}
