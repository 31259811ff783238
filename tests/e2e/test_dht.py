"""Relay discovery with the real binaries on a private DHT on loopback.

Three `tokengo bootstrap` DHT servers, two relays that announce themselves, an exit and a
client that are given no relay: the exit (public: `--public`, since it discovers its relays)
registers through discovery, the client finds a relay
and a chat completion from the official openai SDK reaches the real model server. Everything
uses the test protocol name `/tokengo-test/kad/1.0.0` and the `loopback` address policy, under
which any attempt to dial a non-loopback address is refused and counted; the tests assert
those counters stay at zero. Then the bootstrap nodes stop and a new client still connects
through its cached relay. Nothing here contacts the public DHT (every node gets --bootstrap).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import (
    READY_TIMEOUT,
    RX_CLIENT,
    RX_EXIT,
    RX_RELAY,
    Backend,
    Processes,
    require_tokengo,
)
from tests.e2e.procs import Proc

PROTOCOL = "/tokengo-test/kad/1.0.0"
RX_BOOTSTRAP = r"^bootstrap listening on (/ip4/127\.0\.0\.1/udp/\d+/quic-v1/p2p/\w+)$"
RX_ADMIN = r"^admin endpoint on (http://127\.0\.0\.1:\d+)$"
DHT_TIMEOUT = 60.0


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def metrics(admin: str) -> dict[str, float]:
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def wait_until(what: str, condition, timeout: float = DHT_TIMEOUT) -> None:
    """Polls `condition` until it holds; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError as e:  # the admin endpoint may not answer yet
            last = e
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what} (last error: {last})", pytrace=False)


def stderr_text(proc: Proc) -> str:
    return proc.stderr_path.read_text(errors="replace")


@dataclass
class Net:
    exe: str
    processes: Processes
    tmp: pytest.TempPathFactory
    bootstrap_procs: list[Proc]
    bootstrap: list[str]
    relay_admins: list[str]
    relays: list[str]

    def dht_flags(self) -> list[str]:
        flags = ["--dht-protocol", PROTOCOL, "--address-policy", "loopback"]
        for addr in self.bootstrap:
            flags += ["--bootstrap", addr]
        return flags

    def data_dir(self, name: str) -> str:
        return str(self.tmp.mktemp(f"dht-{name}"))

    def start_client(self, name: str, data_dir: str) -> tuple[Proc, str, str]:
        proc = self.processes.start(
            name,
            [self.exe, "client", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--data-dir", data_dir, *self.dht_flags()],
        )
        admin = proc.wait_for_line(RX_ADMIN, DHT_TIMEOUT).group(1)
        url = proc.wait_for_line(RX_CLIENT, READY_TIMEOUT).group(1)
        return proc, url, admin


def relay_dht_state(admin: str, role: str = "relay") -> str | None:
    dht = get_json(admin + "/status").get(role, {}).get("dht")
    return dht and dht["state"]


@pytest.fixture(scope="module")
def net(processes: Processes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    exe = str(require_tokengo())
    n = Net(exe, processes, tmp_path_factory, [], [], [], [])
    for i in range(3):
        proc = processes.start(
            f"dht-bootstrap-{i}",
            [exe, "bootstrap", "--listen", "127.0.0.1:0", "--data-dir", n.data_dir(f"boot{i}"),
             *n.dht_flags()],
        )
        n.bootstrap_procs.append(proc)
        n.bootstrap.append(proc.wait_for_line(RX_BOOTSTRAP, READY_TIMEOUT).group(1))
    for i in range(2):
        proc = processes.start(
            f"dht-relay-{i}",
            [exe, "relay", "--listen", "127.0.0.1:0", "--dht-announce",
             "--dht-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--data-dir", n.data_dir(f"relay{i}"), *n.dht_flags()],
        )
        admin = proc.wait_for_line(RX_ADMIN, READY_TIMEOUT).group(1)
        n.relays.append(proc.wait_for_line(RX_RELAY, READY_TIMEOUT).group(1))
        n.relay_admins.append(admin)
    for admin in n.relay_admins:
        wait_until(f"relay {admin} announced", lambda: relay_dht_state(admin) == "announced")
    yield n


@pytest.fixture(scope="module")
def exit_proc(net: Net, backend: Backend) -> tuple[Proc, str]:
    proc = net.processes.start(
        "dht-exit",
        [net.exe, "exit", "--public", "--backend", backend.url, "--admin-listen", "127.0.0.1:0",
         "--dht-listen", "127.0.0.1:0", "--data-dir", net.data_dir("exit"), *net.dht_flags()],
    )
    admin = proc.wait_for_line(RX_ADMIN, DHT_TIMEOUT).group(1)
    proc.wait_for_line(RX_EXIT, DHT_TIMEOUT)
    return proc, admin


def chat(url: str, model: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="tokengo-e2e", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello in one word."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices, reply
    return reply.choices[0].message.content or ""


def test_client_and_exit_discover_relays_and_chat_goes_through(
    net: Net, exit_proc: tuple[Proc, str], backend: Backend
) -> None:
    _, exit_admin = exit_proc
    # The exit registered with both discovered relays (the default maximum is 3).
    wait_until(
        "the exit registered with both relays",
        lambda: all(
            get_json(a + "/status")["relay"]["exits_registered"] == 1 for a in net.relay_admins
        ),
    )
    data_dir = net.data_dir("client")
    started = time.monotonic()
    client, url, admin = net.start_client("dht-client", data_dir)
    print(f"client ready after {time.monotonic() - started:.2f}s")
    answer = chat(url, backend.model)
    assert answer.strip(), "empty completion"
    cache = Path(data_dir) / "relays.json"
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    cached = json.loads(cache.read_text())["relays"]
    assert len(cached) == 2 and all(r["exits"] == 1 for r in cached), cached
    client_metrics = metrics(admin)
    assert client_metrics["tokengo_client_dht_relays_verified"] == 2
    # Under the loopback policy any non-loopback dial is refused and counted: none happened.
    assert client_metrics["tokengo_client_dht_dials_refused_total"] == 0
    assert metrics(exit_admin)["tokengo_exit_dht_dials_refused_total"] == 0
    # An exit that discovers its relays announces itself too (its own exit record).
    wait_until("the exit announced", lambda: relay_dht_state(exit_admin, "exit") == "announced")
    exit_metrics = metrics(exit_admin)
    assert exit_metrics["tokengo_exit_dht_external_address_confirmed"] == 1
    assert exit_metrics["tokengo_exit_dht_provider_published"] == 1
    for a in net.relay_admins:
        m = metrics(a)
        assert m["tokengo_relay_dht_dials_refused_total"] == 0
        assert m["tokengo_relay_dht_external_address_confirmed"] == 1
        assert m["tokengo_relay_dht_provider_published"] == 1
    assert "discovery done" in stderr_text(client)
    client.stop()


def test_relay_without_external_address_is_reported(net: Net) -> None:
    flags = [f if f != "loopback" else "any" for f in net.dht_flags()]
    proc = net.processes.start(
        "dht-relay-unconfirmed",
        [net.exe, "relay", "--listen", "127.0.0.1:0", "--dht-announce",
         "--dht-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--data-dir", net.data_dir("relay-unconfirmed"), *flags],
    )
    admin = proc.wait_for_line(RX_ADMIN, READY_TIMEOUT).group(1)
    wait_until("the relay to report it has no external address",
               lambda: relay_dht_state(admin) == "no_external_address")
    assert metrics(admin)["tokengo_relay_dht_external_address_confirmed"] == 0
    wait_until("the warning", lambda: "no confirmed external address" in stderr_text(proc))
    proc.stop()


def test_cached_relay_connects_when_the_dht_is_down(
    net: Net, exit_proc: tuple[Proc, str], backend: Backend
) -> None:
    data_dir = net.data_dir("client-cache")
    first, url, _ = net.start_client("dht-client-first", data_dir)
    chat(url, backend.model)
    first.stop()
    for proc in net.bootstrap_procs:
        proc.stop()
    second, url, admin = net.start_client("dht-client-cached", data_dir)
    assert chat(url, backend.model).strip()
    assert "source=Cache" in stderr_text(second)
    assert metrics(admin)["tokengo_client_dht_dials_refused_total"] == 0
    second.stop()


def test_fallback_relay_is_used_when_dht_and_cache_yield_nothing(
    net: Net, exit_proc: tuple[Proc, str], backend: Backend
) -> None:
    for proc in net.bootstrap_procs:
        proc.stop()
    data_dir = net.data_dir("client-fallback")  # fresh: no relay cache
    config = Path(data_dir) / "client.yaml"
    config.write_text(
        "discovery_timeout_secs: 2\n"
        f"fallback_relays: ['{net.relays[0]}']\n"
    )
    proc = net.processes.start(
        "dht-client-fallback",
        [net.exe, "client", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
         "--config", str(config), *net.dht_flags()],
    )
    url = proc.wait_for_line(RX_CLIENT, DHT_TIMEOUT).group(1)
    assert chat(url, backend.model).strip()
    assert "configured fallback relays" in stderr_text(proc)
    proc.stop()


def test_bootstrap_uses_the_keygen_identity_across_restarts(
    processes: Processes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    exe = str(require_tokengo())
    data_dir = tmp_path_factory.mktemp("dht-boot-identity")
    keygen = subprocess.run(
        [exe, "keygen", "--type", "identity", "--output", str(data_dir / "bootstrap_identity.key")],
        capture_output=True, text=True, check=True,
    )
    peer_id = keygen.stdout.strip()
    for run in range(2):
        proc = processes.start(
            f"dht-boot-identity-{run}",
            [exe, "bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--dht-protocol", PROTOCOL, "--address-policy", "loopback"],
        )
        addr = proc.wait_for_line(RX_BOOTSTRAP, READY_TIMEOUT).group(1)
        assert addr.endswith(f"/p2p/{peer_id}"), addr
        proc.stop()
