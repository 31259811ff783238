"""The container images: both build from the shipped Dockerfiles, are small, run as the
unprivileged user with a read-only root filesystem and no capabilities, and the node image runs
a relay that a `tokengo client` on the host reaches over QUIC, proving the relay's PeerId, and
gets the relay's "no exit" answer (503).

No registry is reachable here, so the builds pass locally made images as build arguments:
the binaries come prebuilt from the host (BINARY=prebuilt: release builds on Debian bookworm,
like the image's libraries) and BUILD_IMAGE is a debootstrapped Debian (scripts/docker-base).
The same Dockerfiles with their defaults compile from source on public images.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO, binary

TAG = "ci"
NODE = f"tokengo-test/node:{TAG}"
OPERATOR = f"tokengo-test/operator:{TAG}"
REPORT = os.environ.get("TOKENGO_IMAGE_REPORT")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def build(dockerfile: str, tag: str, name: str, var: str, base: str, tmp: Path) -> dict:
    context = tmp / name
    (context / "target" / "docker").mkdir(parents=True)
    # Stripped, as the Dockerfile's own build makes it (the workspace keeps line tables).
    subprocess.run(["strip", "--strip-debug", "-o", str(context / "target" / "docker" / name), str(binary(var))], check=True)
    started = time.monotonic()
    result = subprocess.run(
        ["docker", "build", "-f", str(REPO / dockerfile), "-t", tag,
         "--build-arg", "BINARY=prebuilt", "--build-arg", f"BUILD_IMAGE={base}", str(context)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    seconds = time.monotonic() - started
    inspect = json.loads(docker("image", "inspect", tag).stdout)[0]
    return {"image": tag, "seconds": round(seconds, 1), "bytes": inspect["Size"], "config": inspect["Config"]}


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    base = subprocess.run([str(REPO / "scripts" / "docker-base")], capture_output=True, text=True, check=True).stdout.strip()
    tmp = tmp_path_factory.mktemp("images")
    built = {
        "node": build("Dockerfile.node", NODE, "tokengo", "TOKENGO_BIN", base, tmp),
        "operator": build("Dockerfile.operator", OPERATOR, "tokengo-operator", "TOKENGO_OPERATOR_BIN", base, tmp),
    }
    summary = {k: {"image": v["image"], "build_seconds": v["seconds"], "size_mb": round(v["bytes"] / 1e6, 1)} for k, v in built.items()}
    print(f"\nimages: {json.dumps(summary)}")
    if REPORT:
        Path(REPORT).write_text(json.dumps(summary, indent=2) + "\n")
    return built


def test_images_are_small_and_unprivileged(images: dict[str, dict]) -> None:
    for name, info in images.items():
        assert info["config"]["User"] == "65532:65532", name
        # FROM scratch: the binary, glibc, libgcc_s, CA certificates.
        assert info["bytes"] < 80e6, f"{name} image is {info['bytes'] / 1e6:.1f} MB"


def test_node_image_runs_tokengo(images: dict[str, dict]) -> None:
    out = docker("run", "--rm", "--read-only", "--cap-drop", "ALL", NODE, "--version").stdout
    assert re.fullmatch(r"tokengo \d+\.\d+\.\d+\n", out), out
    # No shell in the image: nothing to exec into but the binary.
    assert docker("run", "--rm", "--entrypoint", "/bin/sh", NODE, "-c", "true", check=False).returncode != 0


def test_operator_image_prints_the_committed_crds(images: dict[str, dict]) -> None:
    out = docker("run", "--rm", "--read-only", "--cap-drop", "ALL", OPERATOR, "crd").stdout
    committed = "".join("---\n" + p.read_text() for p in sorted((REPO / "crds").glob("*.yaml"), reverse=True))
    assert sorted(out.split("---\n")) == sorted(committed.split("---\n"))
    assert docker("run", "--rm", OPERATOR, "--version").stdout.startswith("tokengo-operator ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_line_matching(stream, pattern: str, deadline: float) -> re.Match[str]:
    """Reads lines until one matches; the caller's process is killed on timeout by the fixture."""
    lines = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r}; got: {''.join(lines)[-2000:]}")


@pytest.fixture
def relay_container(images: dict[str, dict]) -> Iterator[tuple[int, str]]:
    name = f"tokengo-test-relay-{os.getpid()}"
    docker("run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "--tmpfs", "/data:uid=65532,gid=65532,mode=0700",
           "-e", "TOKENGO_ADMIN_LISTEN=0.0.0.0:9090",
           "-p", "127.0.0.1::4433/udp", "-p", "127.0.0.1::9090/tcp", NODE, "relay", "--data-dir", "/data")
    logs = subprocess.Popen(["docker", "logs", "-f", name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert logs.stdout is not None
        match = read_line_matching(logs.stdout, r"relay listening on (/\S+/p2p/(\w+))", time.monotonic() + 30)
        port = int(docker("port", name, "4433/udp").stdout.strip().rsplit(":", 1)[1])
        admin = int(docker("port", name, "9090/tcp").stdout.strip().rsplit(":", 1)[1])
        # The probes the operator gives relay pods: /healthz and /readyz on the admin port.
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=10) as answer:
                assert answer.status == 200, path
        yield port, match.group(2)
    finally:
        logs.kill()
        docker("rm", "-f", name, check=False)


def client(relay: str, timeout: float = 30) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen([str(binary("TOKENGO_BIN")), "client", "--relay", relay, "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, port


def test_relay_container_answers_a_client_with_no_exit(relay_container: tuple[int, str]) -> None:
    port, peer = relay_container
    proc, http_port = client(f"/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{peer}")
    try:
        assert proc.stdout is not None
        read_line_matching(proc.stdout, r"client listening on", time.monotonic() + 30)
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/chat/completions",
            data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert answer.value.code == 503
        body = json.loads(answer.value.read())
        assert "exit" in body["error"]["message"].lower(), body
    finally:
        proc.kill()
        proc.wait()


def test_a_client_refuses_a_relay_with_another_peer_id(relay_container: tuple[int, str], tmp_path: Path) -> None:
    port, peer = relay_container
    # A well-formed PeerId that is not the relay's.
    key = tmp_path / "other.key"
    out = subprocess.run([str(binary("TOKENGO_BIN")), "keygen", "--type", "identity", "--output", str(key)],
                         capture_output=True, text=True, check=True, timeout=30)
    other = out.stdout.strip()
    assert other.startswith("12D3Koo") and other != peer, out.stdout
    proc, _ = client(f"/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{other}")
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "proves a different PeerId" in err, err
