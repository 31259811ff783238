"""Observability of the real `tokengo serve` binary.

- Traces: with the standard OTEL_* variables pointing at a real OTLP/HTTP (protobuf) receiver on
  loopback (`oteltap`, started by the test), a request produces the expected spans, and trace
  context never crosses the privacy boundary: the client, relay and exit each start their own
  traces, none continues the user's, and the backend receives no trace header.
- The admin endpoint (--admin-listen): /healthz, /readyz, OpenMetrics /metrics, and
  `tokengo status` reading /status.

Both run against the echo backend, which reports the request headers it received."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from oteltap import (
    OtelTapHttpProtobufReceiver,
    OtelTapHttpProtobufReceiverSettings,
    OtelTapInitializationError,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.e2e.conftest import READY_TIMEOUT, RX_SERVE, REPO_ROOT, require_tokengo
from tests.e2e.echo_backend import EchoBackend
from tests.e2e.procs import Proc, base_env
from tests.e2e.test_http import raw_request

RX_ADMIN = r"^admin endpoint on (http://127\.0\.0\.1:\d+)$"
USER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
USER_SPAN = "00f067aa0ba902b7"
PROMPT = "SECRET-PROMPT-e2e-7c21: where do swallows winter?"
SPAN_TIMEOUT = 60.0
TRACE_HEADERS = {
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "uber-trace-id",
    "sentry-trace",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_receiver() -> tuple[OtelTapHttpProtobufReceiver, int]:
    """oteltap binds the port it is given (loopback only) and cannot report one it picked, so
    take a free port and try again (a bounded number of times) if another process won it."""
    last: Exception | None = None
    for _ in range(5):
        port = free_port()
        receiver = OtelTapHttpProtobufReceiver(OtelTapHttpProtobufReceiverSettings(http_port=port))
        try:
            await receiver.start()
            return receiver, port
        except OtelTapInitializationError as e:
            last = e
    raise AssertionError(f"cannot start the OTLP receiver: {last}")


def start_serve(
    tmp_path: Path, name: str, backend_url: str, extra_env: dict[str, str], args: list[str]
) -> Proc:
    env = base_env()
    for key in list(env):
        if key.startswith("OTEL_"):
            env.pop(key)
    env.update(extra_env)
    return Proc(
        name,
        [
            str(require_tokengo()),
            "serve",
            "--backend",
            backend_url,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / f"data-{name}"),
            *args,
        ],
        tmp_path / "logs",
        env=env,
        cwd=REPO_ROOT,
    )


def attrs(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = getattr(value, kind) if kind else None
    return out


def test_otlp_export_reaches_a_real_receiver_and_trace_context_stays_behind(
    tmp_path: Path,
) -> None:
    backend = EchoBackend()
    try:
        asyncio.run(_traces_scenario(tmp_path, backend))
    finally:
        backend.stop()


async def _traces_scenario(tmp_path: Path, backend: EchoBackend) -> None:
    receiver, port = await start_receiver()
    spans: list[Span] = []
    arrived = asyncio.Event()

    async def collect() -> None:
        async for span in receiver.stream_traces():
            spans.append(span)
            arrived.set()

    collector = asyncio.create_task(collect())
    proc = None
    try:
        proc = start_serve(
            tmp_path,
            "otel-serve",
            backend.url,
            {
                # The standard variables, nothing tokengo-specific.
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_SERVICE_NAME": "tokengo-e2e",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            },
            [],
        )
        # Waiting in a thread lets the collector subscribe before any span can exist.
        url = (await asyncio.to_thread(proc.wait_for_line, RX_SERVE, READY_TIMEOUT)).group(1)
        body = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}
        ).encode()
        status, _, echoed = await asyncio.to_thread(
            raw_request,
            url,
            "POST",
            "/v1/chat/completions",
            [
                ("Content-Type", "application/json"),
                ("traceparent", f"00-{USER_TRACE}-{USER_SPAN}-01"),
                ("tracestate", "congo=t61rcWkgMzE"),
                ("baggage", "userId=alice"),
                ("b3", f"{USER_TRACE}-{USER_SPAN}-1"),
                ("X-B3-TraceId", USER_TRACE),
                ("X-B3-SpanId", USER_SPAN),
                ("X-B3-Sampled", "1"),
                ("uber-trace-id", f"{USER_TRACE}:{USER_SPAN}:0:1"),
                ("sentry-trace", f"{USER_TRACE}-{USER_SPAN}-1"),
            ],
            body,
        )
        assert status == 200, echoed[:300]
        received_headers = {k.lower(): v for k, v in json.loads(echoed)["headers"]}

        wanted = {"client.request", "client.attempt", "relay.forward", "exit.request", "exit.backend"}

        async def all_arrived() -> None:
            while not wanted <= {s.name for s in spans}:
                arrived.clear()
                await arrived.wait()

        try:
            await asyncio.wait_for(all_arrived(), SPAN_TIMEOUT)
        except TimeoutError:
            pytest.fail(
                f"spans {sorted(wanted - {s.name for s in spans})} never reached the receiver; "
                f"got {[s.name for s in spans]}\n{proc.stderr_tail(30)}"
            )
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        await receiver.stop()
        if proc is not None:
            proc.stop()

    by_name = {s.name: s for s in spans}
    client_req, client_try = by_name["client.request"], by_name["client.attempt"]
    relay, exit_req, exit_backend = (
        by_name["relay.forward"],
        by_name["exit.request"],
        by_name["exit.backend"],
    )
    # Each role's spans hang together...
    assert client_try.trace_id == client_req.trace_id
    assert client_try.parent_span_id == client_req.span_id
    assert exit_backend.trace_id == exit_req.trace_id
    assert exit_backend.parent_span_id == exit_req.span_id
    # ...but the three roles never share a trace, the relay and exit start from roots, and
    # nobody continued the user's trace.
    assert len({client_req.trace_id, relay.trace_id, exit_req.trace_id}) == 3
    assert relay.parent_span_id == b"" and exit_req.parent_span_id == b""
    assert client_req.parent_span_id == b"", "the client continued the user's trace"
    user_trace = bytes.fromhex(USER_TRACE)
    assert all(s.trace_id != user_trace for s in spans)
    # Kinds and the few attributes spans carry: no prompt, no path, no address.
    assert client_req.kind == Span.SPAN_KIND_SERVER
    assert exit_req.kind == Span.SPAN_KIND_SERVER
    assert exit_backend.kind == Span.SPAN_KIND_CLIENT
    assert attrs(exit_req)["http.request.method"] == "POST"
    assert attrs(exit_req)["tokengo.media"] == "single"
    assert attrs(exit_backend)["http.response.status_code"] == 200
    for span in spans:
        text = str(attrs(span)) + "".join(e.name + str(e.attributes) for e in span.events)
        for needle in ("SECRET-PROMPT", "swallow", "chat/completions", "127.0.0.1", USER_TRACE):
            assert needle not in text, f"{span.name} carries {needle}: {text}"
    # What the backend (behind the exit) received: no trace header at all, and none of the
    # client's ids in any header.
    leaked = TRACE_HEADERS & set(received_headers)
    assert not leaked, f"the backend received {sorted(leaked)}"
    client_ids = {client_req.trace_id.hex(), client_req.span_id.hex(), client_try.span_id.hex()}
    for name, value in received_headers.items():
        for ident in client_ids | {USER_TRACE, USER_SPAN}:
            assert ident not in value.lower(), f"header {name} carries {ident}"


def test_admin_endpoint_health_metrics_and_status(tmp_path: Path) -> None:
    backend = EchoBackend()
    # The echo backend's own path, which the operator allows (exits pass inference endpoints
    # only by default): a path no metric may name.
    proc = start_serve(
        tmp_path,
        "admin-serve",
        backend.url,
        {},
        ["--admin-listen", "127.0.0.1:0", "--allow", "GET /echo/*"],
    )
    try:
        admin = proc.wait_for_line(RX_ADMIN, READY_TIMEOUT).group(1)
        url = proc.wait_for_line(RX_SERVE, READY_TIMEOUT).group(1)

        def get(path: str) -> tuple[int, str, str]:
            try:
                with urllib.request.urlopen(admin + path, timeout=30) as resp:
                    return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.headers.get("Content-Type", ""), e.read().decode()

        assert get("/healthz")[:1] == (200,)
        status, _, text = get("/readyz")
        assert (status, text) == (200, "ready\n")
        for _ in range(3):
            status, _, echoed = raw_request(url, "GET", "/echo/observed")
            assert status == 200, echoed[:300]

        status, ctype, metrics = get("/metrics")
        assert status == 200 and ctype.startswith("application/openmetrics-text"), ctype
        assert metrics.endswith("# EOF\n")
        samples = {}
        for line in metrics.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                samples[series] = float(value)
        assert samples['tokengo_client_requests_total{media="single"}'] == 3
        assert samples['tokengo_exit_requests_total{media="single"}'] == 3
        assert samples['tokengo_relay_requests_total{kind="forward"}'] == 3
        assert samples["tokengo_relay_exits_registered"] == 1
        assert samples['tokengo_exit_gateway_overhead_seconds_count{media="single"}'] == 3
        assert samples['tokengo_client_gateway_overhead_seconds_count{media="single"}'] == 3
        assert any(s.startswith("tokengo_build_info{") for s in samples)
        assert "echo/observed" not in metrics and "127.0.0.1" not in metrics

        out = subprocess.run(
            [str(require_tokengo()), "status", "--admin", admin],
            capture_output=True,
            text=True,
            timeout=60,
            env=base_env(),
        )
        assert out.returncode == 0, out.stderr
        for needle in ("serve — ready", "1 exits registered", "3 requests", "overhead p50"):
            assert needle in out.stdout, out.stdout
    finally:
        proc.stop()
        backend.stop()
