"""Fixtures for the end-to-end tests.

Targets (each test that takes `target` runs once per target):
  direct  the backend itself: a sanity check of the tests, always runs
  serve   `tokengo serve --backend URL` (one process)
  split   `tokengo relay` + `tokengo exit` + `tokengo client` (three processes)

Environment:
  TOKENGO_BIN             the tokengo binary (default: target/debug/tokengo under the repo root)
  TOKENGO_TEST_BACKEND    reuse a running OpenAI-compatible backend at this URL instead of
                          starting the model server (tests/e2e/model_server.py)
  TOKENGO_E2E_READY_TIMEOUT  seconds a tokengo process gets to print its ready line (default 30)
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from tests.e2e.echo_backend import EchoBackend
from tests.e2e.procs import Proc, ProcessError, base_env

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = float(os.environ.get("TOKENGO_E2E_READY_TIMEOUT", "30"))
MODEL_SERVER_TIMEOUT = 300.0  # includes assembling the model on a cold cache

# Every request in these tests goes to loopback; never through a configured proxy.
for _k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_k, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"

# Ready lines on stdout (the CLI contract). Anything after the address is tolerated.
RX_SERVE = r"^tokengo serving on (http://127\.0\.0\.1:\d+)(?:\s|$)"
RX_RELAY = r"^relay listening on (/ip4/127\.0\.0\.1/udp/\d+/quic-v1/p2p/\w+)(?:\s|$)"
RX_EXIT = r"^exit (\w+) registered with relay (/ip4/\S+)"
RX_CLIENT = r"^client listening on (http://127\.0\.0\.1:\d+)(?:\s|$)"


# --------------------------------------------------------------------------- the tokengo binary


def tokengo_bin() -> Path:
    env = os.environ.get("TOKENGO_BIN")
    return Path(env).resolve() if env else REPO_ROOT / "target" / "debug" / "tokengo"


def require_tokengo() -> Path:
    path = tokengo_bin()
    if not path.is_file() or not os.access(path, os.X_OK):
        how = "TOKENGO_BIN" if os.environ.get("TOKENGO_BIN") else "default path"
        raise ProcessError(
            f"tokengo binary not found at {path} ({how}). Build it with `cargo build -p tokengo` "
            f"(or run .ci/run), or point TOKENGO_BIN at it. serve/split tests cannot run "
            f"without it and FAIL on purpose."
        )
    return path


# --------------------------------------------------------------------------- process bookkeeping


class Processes:
    """Every child process the session started; stopped in reverse order at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.log_dir, env=base_env(), cwd=REPO_ROOT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="session")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    procs = Processes(tmp_path_factory.mktemp("logs"))
    yield procs
    procs.stop_all()


# --------------------------------------------------------------------------- the model backend


@dataclass
class Backend:
    url: str
    model: str
    embedding_dim: int | None
    proc: Proc | None = None


def _get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="session")
def backend(processes: Processes) -> Backend:
    url = os.environ.get("TOKENGO_TEST_BACKEND", "").rstrip("/")
    proc = None
    if not url:
        proc = processes.start(
            "model-server",
            [sys.executable, "-m", "tests.e2e.model_server", "--listen", "127.0.0.1:0"],
        )
        try:
            m = proc.wait_for_line(r"model server ready on (http://\S+)\s*$", MODEL_SERVER_TIMEOUT)
        except ProcessError as e:
            pytest.fail(str(e), pytrace=False)
        url = m.group(1)
    try:
        models = _get_json(url + "/v1/models")
    except OSError as e:
        pytest.fail(f"backend {url} does not answer GET /v1/models: {e}", pytrace=False)
    first = models["data"][0]
    n_embd = (first.get("meta") or {}).get("n_embd")
    return Backend(url=url, model=first["id"], embedding_dim=n_embd, proc=proc)


# --------------------------------------------------------------------------- tokengo chains


@dataclass
class Target:
    """An OpenAI-compatible base URL: the backend itself or a tokengo chain in front of it.

    Started lazily on first use, inside the test, so a missing binary or a process that never
    gets ready makes the test FAIL (not error or skip). A failed start is remembered: the other
    tests of the same target fail at once with the same message."""

    kind: str
    backend_url: str
    starter: Callable[[], str] | None = None  # None: direct
    procs: list[Proc] = field(default_factory=list)
    _url: str | None = None
    _error: str | None = None

    @property
    def url(self) -> str:
        if self.starter is None:
            return self.backend_url
        if self._error is not None:
            pytest.fail(f"[{self.kind}] (start failed earlier) {self._error}", pytrace=False)
        if self._url is None:
            try:
                self._url = self.starter()
            except ProcessError as e:
                self._error = str(e)
            if self._error is not None:  # outside `except`: no chained traceback in the report
                pytest.fail(f"[{self.kind}] {self._error}", pytrace=False)
        assert self._url is not None
        return self._url

    def openai(self, **kw: object) -> openai.OpenAI:
        kw.setdefault("timeout", 120.0)
        return openai.OpenAI(base_url=self.url + "/v1", api_key="tokengo-e2e", max_retries=0, **kw)


# Operator settings per chain label. The echo chain checks transparency on the echo backend's
# own paths and headers, which an exit does not pass by default: its operator allows them.
EXIT_ARGS: dict[str, list[str]] = {"echo": ["--allow", "* /echo/*"]}
CLIENT_ARGS: dict[str, list[str]] = {
    "echo": ["--forward-header", "X-Tokengo-Repeat,X-Tokengo-Single"]
}


class Chains:
    def __init__(self, processes: Processes, tmp: pytest.TempPathFactory) -> None:
        self.processes = processes
        self.tmp = tmp
        self.targets: dict[tuple[str, str], Target] = {}

    def _data_dir(self, name: str) -> str:
        return str(self.tmp.mktemp(f"data-{name}"))

    def _serve(self, label: str, backend_url: str, target: Target) -> str:
        exe = str(require_tokengo())
        extra = EXIT_ARGS.get(label, []) + CLIENT_ARGS.get(label, [])
        proc = self.processes.start(
            f"{label}-serve",
            [
                exe,
                "serve",
                "--backend",
                backend_url,
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                self._data_dir(f"{label}-serve"),
                *extra,
            ],
        )
        target.procs.append(proc)
        return proc.wait_for_line(RX_SERVE, READY_TIMEOUT).group(1)

    def _split(self, label: str, backend_url: str, target: Target) -> str:
        exe = str(require_tokengo())
        relay = self.processes.start(
            f"{label}-relay",
            [
                exe,
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                self._data_dir(f"{label}-relay"),
            ],
        )
        target.procs.append(relay)
        relay_addr = relay.wait_for_line(RX_RELAY, READY_TIMEOUT).group(1)
        exit_ = self.processes.start(
            f"{label}-exit",
            [
                exe,
                "exit",
                "--relay",
                relay_addr,
                "--backend",
                backend_url,
                "--data-dir",
                self._data_dir(f"{label}-exit"),
                *EXIT_ARGS.get(label, []),
            ],
        )
        target.procs.append(exit_)
        exit_.wait_for_line(RX_EXIT, READY_TIMEOUT)
        client = self.processes.start(
            f"{label}-client",
            [
                exe,
                "client",
                "--relay",
                relay_addr,
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                self._data_dir(f"{label}-client"),
                *CLIENT_ARGS.get(label, []),
            ],
        )
        target.procs.append(client)
        return client.wait_for_line(RX_CLIENT, READY_TIMEOUT).group(1)

    def get(self, kind: str, backend_url: str, label: str) -> Target:
        key = (kind, backend_url)
        if key not in self.targets:
            target = Target(kind=kind, backend_url=backend_url)
            if kind == "serve":
                target.starter = lambda: self._serve(label, backend_url, target)
            elif kind == "split":
                target.starter = lambda: self._split(label, backend_url, target)
            elif kind != "direct":
                raise ValueError(kind)
            self.targets[key] = target
        return self.targets[key]


@pytest.fixture(scope="session")
def chains(processes: Processes, tmp_path_factory: pytest.TempPathFactory) -> Chains:
    return Chains(processes, tmp_path_factory)


@pytest.fixture(scope="session", params=["direct", "serve", "split"])
def target(request: pytest.FixtureRequest, backend: Backend, chains: Chains) -> Target:
    """The model backend, directly or through tokengo."""
    return chains.get(request.param, backend.url, "model")


@pytest.fixture(scope="session")
def closed_port_url() -> Iterator[str]:
    """A loopback URL nothing listens on. The port stays bound (never listening) for the whole
    session, so connections to it are refused and no other process can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture(scope="session", params=["serve", "split"])
def broken_target(request: pytest.FixtureRequest, closed_port_url: str, chains: Chains) -> Target:
    """A tokengo chain whose backend is a closed loopback port (not applicable to `direct`)."""
    return chains.get(request.param, closed_port_url, "unreachable")


@pytest.fixture(scope="session")
def echo_backend() -> Iterator[EchoBackend]:
    echo = EchoBackend()
    yield echo
    echo.stop()


@pytest.fixture(scope="session", params=["serve", "split"])
def echo_chain(request: pytest.FixtureRequest, echo_backend: EchoBackend, chains: Chains) -> Target:
    """The echo backend through tokengo only (what the chain refuses or rewrites)."""
    return chains.get(request.param, echo_backend.url, "echo")


@pytest.fixture(scope="session", params=["direct", "serve", "split"])
def echo_target(
    request: pytest.FixtureRequest, echo_backend: EchoBackend, chains: Chains
) -> Target:
    """The echo backend, directly or through tokengo."""
    return chains.get(request.param, echo_backend.url, "echo")


# --------------------------------------------------------------------------- failure reports


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """On a failed test, attach the stderr tails of the processes behind its target."""
    report = yield
    if report.when == "call" and report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in ("target", "broken_target", "echo_target"):
            t = funcargs.get(name)
            if isinstance(t, Target) and t._error is None:  # a start error shows its own tail
                for proc in t.procs:
                    report.sections.append(
                        (f"{proc.name} stderr ({proc.stderr_path})", proc.stderr_tail(40))
                    )
        b = funcargs.get("backend")
        if isinstance(b, Backend) and b.proc is not None and "target" in funcargs:
            report.sections.append(
                (f"model-server stderr ({b.proc.stderr_path})", b.proc.stderr_tail(15))
            )
    return report
