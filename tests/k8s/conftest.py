"""Fixtures for the chart and image tests: the chart's path, a real local control plane
(scripts/k8s-cluster: etcd, kube-apiserver 1.20, kube-controller-manager) and a small client
for it built on the standard library (server-side apply, get, watch).

Environment:
  TOKENGO_BIN, TOKENGO_OPERATOR_BIN  release binaries for the image tests and the operator run
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tokengo"

# Where each kind lives in the API: (path prefix, plural, namespaced).
KINDS = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Secret": ("/api/v1", "secrets", True),
    "Service": ("/api/v1", "services", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "StatefulSet": ("/apis/apps/v1", "statefulsets", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases", True),
    "TokenGoRelay": ("/apis/tokengo.io/v1alpha1", "tokengorelays", True),
    "TokenGoExit": ("/apis/tokengo.io/v1alpha1", "tokengoexits", True),
    "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False),
}


class ApiError(AssertionError):
    def __init__(self, code: int, body: str) -> None:
        super().__init__(f"HTTP {code}: {body[:2000]}")
        self.code = code
        self.body = body


class Cluster:
    """A running local control plane and an admin client for it."""

    def __init__(self, directory: Path, url: str) -> None:
        self.dir = directory
        self.url = url
        self.kubeconfig = directory / "kubeconfig"
        self.token = (directory / "admin.token").read_text().strip()
        self.tls = ssl.create_default_context(cafile=str(directory / "ca.crt"))

    def path(self, kind: str, namespace: str | None, name: str | None = None) -> str:
        prefix, plural, namespaced = KINDS[kind]
        out = prefix
        if namespaced:
            assert namespace, f"{kind} needs a namespace"
            out += f"/namespaces/{namespace}"
        out += f"/{plural}"
        if name:
            out += f"/{name}"
        return out

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json", timeout: float = 30) -> dict:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.tls, timeout=timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from None

    def apply(self, doc: dict, namespace: str | None = None, manager: str = "tokengo-tests") -> dict:
        """Server-side apply of one object (what `kubectl apply --server-side` does)."""
        kind = doc["kind"]
        name = doc["metadata"]["name"]
        ns = doc["metadata"].get("namespace") or namespace
        path = self.path(kind, ns, name) + f"?fieldManager={manager}&force=true"
        return self.request("PATCH", path, json.dumps(doc).encode(), "application/apply-patch+yaml")

    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    def wait_for(self, kind: str, namespace: str | None, name: str, what: str, cond: Callable[[dict], bool], timeout: float = 60) -> dict:
        """Watches the object until `cond` holds; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.get(kind, namespace, name)
            if current is not None and cond(current):
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {kind} {name}: {what}; last: {json.dumps(current)[:1500]}")
            version = (current or {}).get("metadata", {}).get("resourceVersion")
            query = f"?watch=1&fieldSelector=metadata.name%3D{name}&timeoutSeconds={max(1, int(remaining))}"
            if version:
                query += f"&resourceVersion={version}"
            req = urllib.request.Request(self.url + self.path(kind, namespace) + query)
            req.add_header("Authorization", f"Bearer {self.token}")
            try:
                with urllib.request.urlopen(req, context=self.tls, timeout=remaining + 5) as stream:
                    for line in stream:
                        event = json.loads(line)
                        if event.get("type") in ("ADDED", "MODIFIED") and cond(event["object"]):
                            return event["object"]
            except (TimeoutError, urllib.error.URLError):
                pass


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The control plane, without CRDs (the chart installs its own). A failure to build or
    start it fails the tests that need it."""
    directory = tmp_path_factory.mktemp("cluster")
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "k8s-cluster"), str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        pytest.fail(f"the local control plane did not start (scripts/k8s-cluster said {line!r})")
    try:
        yield Cluster(directory, line.split()[1])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the script stops everything when its stdin closes
        proc.wait(timeout=60)


def binary(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.fail(f"{var} is not set (.ci/k8s sets it to a release build)")
    path = Path(value)
    assert path.is_file(), f"{var}={value} does not exist"
    return path
