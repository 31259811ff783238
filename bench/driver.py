#!/usr/bin/env python3
"""TokenGo benchmark driver (run through bench/run, which installs and builds what it needs).

Starts everything itself on 127.0.0.1 (nginx with its own config in a temp dir as the backend,
three release `tokengo` processes for the chain, `tokengo serve`, spare relays for the QUIC
benchmarks), measures each scenario against the backend alone in the same run, prints a table
and writes every number as JSON. It never asserts on timing: it fails (non-zero exit, message
on stderr) only when a measurement cannot be produced. Standard library only.
"""

import argparse
import http.client
import http.server
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
STREAM_PATH = "/stream/events.sse"
EVENTS = 1000
PACED_PATH = "/paced/events"
# The streaming figures read static SSE files by GET, which an exit refuses unless allowed
# (only inference endpoints reach a backend by default).
EXIT_ALLOW = ["--allow", "GET /stream/*", "--allow", "GET /paced/*"]
PACED_EVENTS = 50
PACED_GAP_S = 0.002
# A model's stream at its most demanding: 1,000 events 1 ms apart (1,000 tokens/s).
MODEL_EVENTS = 1000
MODEL_GAP_S = 0.001

# nginx's fixed answer: an OpenAI chat completion of typical size.
CHAT_RESPONSE = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    },
    separators=(",", ":"),
)
MODELS_RESPONSE = '{"object":"list","data":[{"id":"bench","object":"model","owned_by":"bench"}]}'

TARGETS = {
    "added_p50_ms": 0.5,
    "added_p99_ms": 1.5,
    "cpu_floor_ratio": 3.0,
    "throughput_ratio": 0.10,
    "ttfe_added_ms": 1.0,
    "stream_total_ratio": 1.10,
    "relay_gbit_s": 1.0,
    "conn_kib": 64.0,
}


class BenchError(Exception):
    """A measurement could not be produced."""


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def chat_body(content_len):
    """A chat request whose JSON is about `content_len` bytes longer than the minimum."""
    return json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": "x" * content_len}],
            "max_tokens": 16,
        },
        separators=(",", ":"),
    ).encode()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A child process with its output in files; stopped by PID (TERM, then KILL)."""

    def __init__(self, name, argv, workdir, env=None, stdin=None):
        self.name = name
        self.out_path = os.path.join(workdir, f"{name}.out")
        self.err_path = os.path.join(workdir, f"{name}.err")
        self.out = open(self.out_path, "wb")
        self.err = open(self.err_path, "wb")
        self.popen = subprocess.Popen(
            argv,
            stdout=self.out,
            stderr=self.err,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            env=env,
        )
        self.pid = self.popen.pid

    def wait_line(self, prefix, timeout=60.0):
        """The first stdout line starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.out_path, "r", errors="replace") as f:
                for line in f:
                    if line.startswith(prefix):
                        return line.strip()
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited ({self.popen.returncode}): {self.tail()}")
            time.sleep(0.02)
        raise BenchError(f"{self.name} printed no '{prefix}' line in {timeout:.0f}s: {self.tail()}")

    def tail(self, lines=15):
        try:
            with open(self.err_path, "r", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self):
        """utime + stime of the process (all its threads)."""
        _, ticks = proc_stat(self.pid)
        return ticks / CLK_TCK

    def rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise BenchError(f"no VmRSS for {self.name}")

    def stop(self):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.out.close()
        self.err.close()


def proc_stat(pid):
    """(parent PID, utime + stime in clock ticks) of `pid`, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: ppid is field 4, utime 14, stime 15 (1-based, man 5 proc).
    return int(fields[1]), int(fields[11]) + int(fields[12])


def process_tree_cpu_seconds(pid):
    """utime + stime of `pid` and its direct children (nginx's master and workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid, ticks = proc_stat(int(entry))
        except OSError:
            continue  # the process ended meanwhile
        if int(entry) == pid or ppid == pid:
            total += ticks
    return total / CLK_TCK


class Children:
    """Everything started here, stopped in reverse order on any exit."""

    def __init__(self):
        self.procs = []

    def start(self, *args, **kwargs):
        proc = Proc(*args, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc):
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as error:  # noqa: BLE001 - best effort at teardown
                log(f"stopping {proc.name}: {error}")
        self.procs.clear()


# ------------------------------------------------------------------------------------------------
# HTTP helpers


def post_ok(port, body, timeout=5.0):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", CHAT_PATH, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        return response.status == 200 and b"chatcmpl-bench" in data
    finally:
        conn.close()


def wait_ready(port, proc, timeout=60.0):
    """Polls with a small chat request until it succeeds."""
    deadline = time.monotonic() + timeout
    body = chat_body(16)
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited ({proc.popen.returncode}): {proc.tail()}")
        try:
            if post_ok(port, body, timeout=2.0):
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.005)
    raise BenchError(f"nothing answered a chat request on port {port} within {timeout:.0f}s")


# ------------------------------------------------------------------------------------------------
# Setup: backend and TokenGo processes


class PacedHandler(http.server.BaseHTTPRequestHandler):
    """An SSE stream paced like a model's tokens: `events` small events `gap_ms` apart (query
    parameters; PACED_EVENTS and PACED_GAP_S by default), each flushed on its own. nginx
    proxies it unbuffered, so the direct and chained paths both go through nginx."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        events = int(query.get("events", [PACED_EVENTS])[0])
        gap_s = float(query.get("gap_ms", [PACED_GAP_S * 1e3])[0]) / 1e3
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for n in range(events):
            data = f"data: event {n}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(gap_s)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class PacedServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def start_paced():
    server = PacedServer((HOST, 0), PacedHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def write_backend(workdir, port, paced_port):
    root = os.path.join(workdir, "www")
    os.makedirs(os.path.join(root, "stream"), exist_ok=True)
    events = []
    for n in range(EVENTS):
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "model": "bench",
            "choices": [{"index": 0, "delta": {"content": f" token{n}"}, "finish_reason": None}],
        }
        events.append("data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n")
    events.append("data: [DONE]\n\n")
    sse = "".join(events).encode()
    with open(os.path.join(root, "stream", "events.sse"), "wb") as f:
        f.write(sse)
    conf = f"""
daemon off;
worker_processes auto;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    client_max_body_size 64m;
    client_body_buffer_size 128k;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    types {{ text/event-stream sse; }}
    server {{
        listen {HOST}:{port};
        location = {CHAT_PATH} {{
            default_type application/json;
            return 200 '{CHAT_RESPONSE}';
        }}
        location = /v1/models {{
            default_type application/json;
            return 200 '{MODELS_RESPONSE}';
        }}
        location /stream/ {{ root {root}; }}
        location /paced/ {{
            proxy_pass http://{HOST}:{paced_port};
            proxy_http_version 1.1;
            proxy_buffering off;
        }}
        location / {{ return 404; }}
    }}
}}
"""
    path = os.path.join(workdir, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    # nginx's workers run as an unprivileged user when started as root: let them read the files.
    for directory in (workdir, root, os.path.join(root, "stream")):
        os.chmod(directory, 0o755)
    os.chmod(os.path.join(root, "stream", "events.sse"), 0o644)
    return path, sse


def start_chain(children, tokengo, workdir, backend_url, client_port, env):
    relay = children.start(
        "relay",
        [tokengo, "relay", "--listen", f"{HOST}:0", "--data-dir", os.path.join(workdir, "relay")],
        workdir,
        env=env,
    )
    addr = relay.wait_line("relay listening on ").split()[-1]
    exit_ = children.start(
        "exit",
        [tokengo, "exit", "--relay", addr, "--backend", backend_url,
         "--data-dir", os.path.join(workdir, "exit"), *EXIT_ALLOW],
        workdir,
        env=env,
    )
    client = children.start(
        "client",
        [tokengo, "client", "--relay", addr, "--listen", f"{HOST}:{client_port}",
         "--data-dir", os.path.join(workdir, "client")],
        workdir,
        env=env,
    )
    wait_ready(client_port, client)
    return relay, exit_, client


# ------------------------------------------------------------------------------------------------
# wrk

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d," ..
    "\\"mean_us\\":%.1f,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk(port, script, connections, seconds, label):
    threads = 1 if connections == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
            "-s", script, f"http://{HOST}:{port}{CHAT_PATH}"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^WRKJSON (\{.*\})$", run.stdout, re.M)
    if run.returncode != 0 or not match:
        raise BenchError(f"wrk {label} failed ({run.returncode}): {run.stdout}\n{run.stderr}")
    result = json.loads(match.group(1))
    errors = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    if errors:
        raise BenchError(f"wrk {label}: {errors} failed requests: {result}")
    if result["requests"] < 1:
        raise BenchError(f"wrk {label}: no requests completed")
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    log(f"{label}: {result['requests']} req, {result['rps']:.0f} req/s, "
        f"p50 {result['p50_us']} us, p99 {result['p99_us']} us")
    return result


# ------------------------------------------------------------------------------------------------
# Streaming


def stream_once(port, expected):
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        started = time.perf_counter()
        conn.request("GET", STREAM_PATH, headers={"Accept": "text/event-stream"})
        response = conn.getresponse()
        if response.status != 200:
            raise BenchError(f"stream: HTTP {response.status}")
        first = response.read1(1 << 20)
        ttfe = time.perf_counter() - started
        rest = response.read()
        total = time.perf_counter() - started
    finally:
        conn.close()
    body = first + rest
    if not first.startswith(b"data: ") or body != expected:
        raise BenchError(f"stream: body differs from the file ({len(body)} of {len(expected)} bytes)")
    return ttfe, total


def stream_bench(port, expected, iterations):
    ttfes, totals = [], []
    stream_once(port, expected)  # warm-up: connections to the backend, pools
    for _ in range(iterations):
        ttfe, total = stream_once(port, expected)
        ttfes.append(ttfe * 1e3)
        totals.append(total * 1e3)
    return {"ttfe_ms": statistics.median(ttfes), "total_ms": statistics.median(totals),
            "iterations": iterations}


def paced_bench(port, iterations, events=PACED_EVENTS, gap_s=PACED_GAP_S):
    """Time to the first event, total time and the largest gap between two reads of a paced
    stream of `events` events `gap_s` apart."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    path = f"{PACED_PATH}?events={events}&gap_ms={gap_s * 1e3:g}"
    totals, gaps, ttfes = [], [], []
    try:
        for iteration in range(iterations + 1):
            started = last = time.perf_counter()
            conn.request("GET", path, headers={"Accept": "text/event-stream"})
            response = conn.getresponse()
            if response.status != 200:
                raise BenchError(f"paced stream: HTTP {response.status}")
            body = b""
            while True:
                piece = response.read1(1 << 16)
                if not piece:
                    break
                now = time.perf_counter()
                if not body:
                    ttfes.append((now - started) * 1e3)
                else:
                    gaps.append((now - last) * 1e3)
                last = now
                body += piece
            totals.append((time.perf_counter() - started) * 1e3)
            if body.count(b"data: ") != events:
                raise BenchError(f"paced stream: {body.count(b'data: ')} of {events} events")
            if iteration == 0:  # the first one only warms up
                totals.clear()
                gaps.clear()
                ttfes.clear()
    finally:
        conn.close()
    return {"total_ms": statistics.median(totals), "ttfe_ms": statistics.median(ttfes),
            "max_gap_ms": max(gaps, default=0.0), "gaps_over_10ms": sum(g > 10 for g in gaps),
            "iterations": iterations}


# ------------------------------------------------------------------------------------------------
# QUIC benches through tokengo-bench


def relay_forward(children, tokengo, bench_bin, workdir, env, quick):
    relay = children.start(
        "relay-fwd",
        [tokengo, "relay", "--listen", f"{HOST}:0", "--data-dir", os.path.join(workdir, "relay-fwd")],
        workdir, env=env)
    addr = relay.wait_line("relay listening on ").split()[-1]
    body_mib, streams = (4, 4) if quick else (16, 16)
    cpu0 = relay.cpu_seconds()
    run = subprocess.run([bench_bin, "forward", "--relay", addr, "--body-mib", str(body_mib),
                          "--streams", str(streams), "--concurrency", "4"],
                         capture_output=True, text=True, timeout=300)
    cpu = relay.cpu_seconds() - cpu0
    children.stop(relay)
    if run.returncode != 0:
        raise BenchError(f"tokengo-bench forward failed: {run.stderr}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    total = result["bytes_to_exit"] + result["bytes_to_client"]
    result["gbit_s"] = total * 8 / result["seconds"] / 1e9
    result["relay_cpu_s"] = cpu
    log(f"relay forwarding: {total / 2**20:.0f} MiB in {result['seconds']:.2f}s "
        f"= {result['gbit_s']:.2f} Gbit/s (relay CPU {cpu:.2f}s)")
    return result


def relay_conns(children, tokengo, bench_bin, workdir, env, count):
    # Every connection comes from one address here: the per-address connection rate, which
    # would admit 64 and then 8 a second, is off for this measurement of memory.
    relay = children.start(
        "relay-conns",
        [tokengo, "relay", "--listen", f"{HOST}:0", "--data-dir",
         os.path.join(workdir, "relay-conns"), "--source-connections-per-sec", "0"],
        workdir, env=env)
    addr = relay.wait_line("relay listening on ").split()[-1]
    time.sleep(0.5)
    rss0 = relay.rss_kib()
    gen = children.start("conns", [bench_bin, "conns", "--relay", addr, "--count", str(count)],
                         workdir, env=env, stdin=subprocess.PIPE)
    line = gen.wait_line("{", timeout=600)
    time.sleep(2.0)  # let the relay's connection tasks settle
    rss1 = relay.rss_kib()
    gen.popen.stdin.close()
    try:
        rc = gen.popen.wait(timeout=60)
    except subprocess.TimeoutExpired as error:
        raise BenchError("tokengo-bench conns did not finish") from error
    if rc != 0:
        raise BenchError(f"tokengo-bench conns failed: {gen.tail()}")
    children.stop(gen)
    children.stop(relay)
    result = json.loads(line)
    if result["connections"] != count:
        raise BenchError(f"only {result['connections']} of {count} connections opened")
    result.update(rss_before_kib=rss0, rss_after_kib=rss1,
                  kib_per_conn=(rss1 - rss0) / count)
    log(f"{count} idle connections: relay RSS {rss0} -> {rss1} KiB = "
        f"{result['kib_per_conn']:.1f} KiB each (opened in {result['open_seconds']:.1f}s)")
    return result


# ------------------------------------------------------------------------------------------------
# serve start-up


def serve_startup(children, tokengo, workdir, backend_url, env, runs):
    data = os.path.join(workdir, "serve-startup")
    port = free_port()
    argv = [tokengo, "serve", "--listen", f"{HOST}:{port}", "--backend", backend_url,
            "--data-dir", data]
    first = children.start("serve-keys", argv, workdir, env=env)
    wait_ready(port, first)  # creates the keys
    children.stop(first)
    times = []
    for n in range(runs):
        started = time.perf_counter()
        proc = children.start(f"serve-start{n}", argv, workdir, env=env)
        wait_ready(port, proc, timeout=30)
        times.append((time.perf_counter() - started) * 1e3)
        children.stop(proc)
    result = {"median_ms": statistics.median(times), "min_ms": min(times),
              "max_ms": max(times), "runs": runs}
    log(f"serve start-up with existing keys: median {result['median_ms']:.1f} ms over {runs}")
    return result


# ------------------------------------------------------------------------------------------------
# Crypto floor (criterion)


def crypto_floor(repo, quick):
    argv = ["cargo", "bench", "--locked", "-p", "tokengo-proto", "--bench", "crypto_floor", "--",
            "--output-format", "bencher"]
    if quick:
        argv += ["--warm-up-time", "0.3", "--measurement-time", "1", "--sample-size", "10"]
    log("criterion: " + " ".join(argv))
    run = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise BenchError(f"cargo bench failed: {run.stderr[-3000:]}")
    results = {}
    for name, ns in re.findall(r"^test (\S+)\s+\.\.\. bench:\s+([\d,.]+) ns/iter", run.stdout, re.M):
        results[name] = float(ns.replace(",", "")) / 1e3
    if "floor/ohttp_roundtrip" not in results:
        raise BenchError(f"criterion printed no floor/ohttp_roundtrip: {run.stdout[-2000:]}")
    log("crypto floor: " + ", ".join(f"{k} {v:.1f} us" for k, v in results.items()))
    return results


# ------------------------------------------------------------------------------------------------
# Report


def machine_info():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "load_before": os.getloadavg()}


def verdict(value, target, lower_is_better=True):
    if value is None:
        return "n/a"
    ok = value <= target if lower_is_better else value >= target
    return "met" if ok else "MISSED"


def report(results):
    rows = []  # (measurement, direct/base, chain, added/ratio, target, verdict)
    lat = results["latency"]
    for size in ("small", "32k"):
        for conc in (1, 64):
            key = f"{size}_c{conc}"
            d, c = lat[key]["direct"], lat[key]["chain"]
            for pct in ("p50", "p99"):
                added = (c[f"{pct}_us"] - d[f"{pct}_us"]) / 1e3
                target = verdict_txt = ""
                if size == "small" and conc == 1:
                    target = TARGETS[f"added_{pct}_ms"]
                    verdict_txt = verdict(added, target)
                    target = f"<= {target} ms added"
                rows.append((f"latency {pct} {size} c{conc}", f"{d[f'{pct}_us'] / 1e3:.3f} ms",
                             f"{c[f'{pct}_us'] / 1e3:.3f} ms",
                             f"+{added:.3f} ms (x{c[f'{pct}_us'] / max(d[f'{pct}_us'], 1):.1f})",
                             target, verdict_txt))
    tp = results["throughput"]
    for name, base in (("chain", "direct"), ("serve", "direct_beside_serve")):
        ratio = tp[name]["rps"] / tp[base]["rps"]
        rows.append((f"throughput {name} (small, c64)", f"{tp[base]['rps']:.0f} req/s",
                     f"{tp[name]['rps']:.0f} req/s", f"{ratio * 100:.1f}% of backend",
                     ">= 10%", verdict(ratio, TARGETS["throughput_ratio"], False)))
    cpu = results["cpu"]
    for conc in ("c1", "c64"):
        per = cpu[conc]["us_per_request"]
        rows.append((f"CPU/request client+relay+exit ({conc})",
                     f"floor {cpu['floor_us']:.1f} us", f"{per:.1f} us",
                     f"x{per / cpu['floor_us']:.1f} floor", "<= 3x",
                     verdict(per / cpu["floor_us"], TARGETS["cpu_floor_ratio"])))
    for conc in ("c1", "c64"):
        rows.append((f"CPU/request nginx alone ({conc}), for scale", "",
                     f"{cpu[conc]['nginx_us_per_request']:.1f} us", "", "", ""))
    st = results["streaming"]
    ttfe_added = st["chain"]["ttfe_ms"] - st["direct"]["ttfe_ms"]
    total_ratio = st["chain"]["total_ms"] / st["direct"]["total_ms"]
    ms = results["model_stream"]
    ms_ttfe = ms["chain"]["ttfe_ms"] - ms["direct"]["ttfe_ms"]
    ms_ratio = ms["chain"]["total_ms"] / ms["direct"]["total_ms"]
    label = f"model stream ({ms['events']} events {ms['gap_ms']:g} ms apart)"
    rows.append((f"{label}: TTFE", f"{ms['direct']['ttfe_ms']:.3f} ms",
                 f"{ms['chain']['ttfe_ms']:.3f} ms", f"+{ms_ttfe:.3f} ms", "<= 1 ms added",
                 verdict(ms_ttfe, TARGETS["ttfe_added_ms"])))
    rows.append((f"{label}: total", f"{ms['direct']['total_ms']:.1f} ms",
                 f"{ms['chain']['total_ms']:.1f} ms", f"x{ms_ratio:.3f}", "<= x1.10",
                 verdict(ms_ratio, TARGETS["stream_total_ratio"])))
    rows.append(("burst file (1000 events at once): TTFE", f"{st['direct']['ttfe_ms']:.3f} ms",
                 f"{st['chain']['ttfe_ms']:.3f} ms", f"+{ttfe_added:.3f} ms", "<= 1 ms added",
                 verdict(ttfe_added, TARGETS["ttfe_added_ms"])))
    rows.append(("burst file (1000 events at once): total", f"{st['direct']['total_ms']:.3f} ms",
                 f"{st['chain']['total_ms']:.3f} ms", f"x{total_ratio:.2f}", "<= x1.10",
                 verdict(total_ratio, TARGETS["stream_total_ratio"])))
    pc = results["paced"]
    rows.append((f"paced stream ({pc['events']} events {pc['gap_ms']:.0f} ms apart): max gap",
                 f"{pc['direct']['max_gap_ms']:.1f} ms", f"{pc['chain']['max_gap_ms']:.1f} ms",
                 f"total x{pc['chain']['total_ms'] / pc['direct']['total_ms']:.2f}", "", ""))
    fw = results["relay_forward"]
    rows.append(("relay forwarding, large bodies", "", f"{fw['gbit_s']:.2f} Gbit/s",
                 f"{fw['body_bytes'] >> 20} MiB bodies, both ways", ">= 1 Gbit/s",
                 verdict(fw["gbit_s"], TARGETS["relay_gbit_s"], False)))
    cn = results["relay_conns"]
    rows.append((f"relay RSS per idle connection ({cn['connections']})", "",
                 f"{cn['kib_per_conn']:.1f} KiB", f"{cn['rss_before_kib']}->{cn['rss_after_kib']} KiB",
                 "<= 64 KiB", verdict(cn["kib_per_conn"], TARGETS["conn_kib"])))
    su = results["serve_startup"]
    rows.append(("serve start-up, existing keys", "", f"{su['median_ms']:.1f} ms",
                 f"min {su['min_ms']:.1f} max {su['max_ms']:.1f}", "", ""))
    header = ("measurement", "backend alone / base", "TokenGo", "added / ratio", "target", "verdict")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(6)]
    lines = []
    for row in [header, tuple("-" * w for w in widths)] + rows:
        lines.append(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines), rows


def markdown(rows):
    """The same table in Markdown, for the README."""
    header = ("measurement", "backend alone / base", "TokenGo", "added / ratio", "target", "verdict")
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds per measurement")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--tokengo", required=True)
    parser.add_argument("--bench-bin", required=True)
    parser.add_argument("--repo", required=True)
    args = parser.parse_args()
    quick = args.quick
    seconds = 2 if quick else 10
    conns = 1000 if quick else 10_000
    stream_iterations = 5 if quick else 50
    startup_runs = 3 if quick else 10

    results = {"quick": quick, "machine": machine_info(), "pinning": "none: every process "
               "shares both cores (wrk, nginx and the TokenGo processes alike)",
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    children = Children()
    workdir = tempfile.mkdtemp(prefix="tokengo-bench.")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    try:
        results["crypto_floor_us"] = crypto_floor(args.repo, quick)

        paced = start_paced()
        nginx_port = free_port()
        conf, sse = write_backend(workdir, nginx_port, paced.server_address[1])
        nginx = children.start("nginx", ["nginx", "-p", workdir, "-c", conf, "-e",
                                         os.path.join(workdir, "nginx-error.log")], workdir)
        wait_ready(nginx_port, nginx)
        backend_url = f"http://{HOST}:{nginx_port}"
        log(f"nginx on {backend_url} (pid {nginx.pid})")

        client_port = free_port()
        relay, exit_, client = start_chain(children, args.tokengo, workdir, backend_url,
                                           client_port, env)
        chain = (relay, exit_, client)
        log(f"chain: client :{client_port} -> relay (pid {relay.pid}) -> exit (pid {exit_.pid})")

        bodies = {}
        for size, content in (("small", 64), ("32k", 32 * 1024)):
            path = os.path.join(workdir, f"body-{size}.json")
            with open(path, "wb") as f:
                f.write(chat_body(content))
            script = os.path.join(workdir, f"post-{size}.lua")
            with open(script, "w") as f:
                f.write(WRK_LUA.format(body=path))
            bodies[size] = script

        # Warm-up: pools, QUIC windows, page cache.
        wrk(client_port, bodies["small"], 8, 1, "warm-up chain")
        wrk(nginx_port, bodies["small"], 8, 1, "warm-up direct")

        latency, cpu = {}, {}
        for size in ("small", "32k"):
            for conc in (1, 64):
                key = f"{size}_c{conc}"
                nginx0 = process_tree_cpu_seconds(nginx.pid)
                direct = wrk(nginx_port, bodies[size], conc, seconds, f"direct {key}")
                nginx_spent = process_tree_cpu_seconds(nginx.pid) - nginx0
                cpu0 = sum(p.cpu_seconds() for p in chain)
                proxied = wrk(client_port, bodies[size], conc, seconds, f"chain {key}")
                spent = sum(p.cpu_seconds() for p in chain) - cpu0
                latency[key] = {"direct": direct, "chain": proxied}
                if size == "small":
                    cpu[f"c{conc}"] = {"cpu_s": spent, "requests": proxied["requests"],
                                       "us_per_request": spent / proxied["requests"] * 1e6,
                                       "nginx_us_per_request":
                                           nginx_spent / direct["requests"] * 1e6}
        results["latency"] = latency
        cpu["floor_us"] = results["crypto_floor_us"]["floor/ohttp_roundtrip"]
        results["cpu"] = cpu

        stream_direct = stream_bench(nginx_port, sse, stream_iterations)
        stream_chain = stream_bench(client_port, sse, stream_iterations)
        results["streaming"] = {"direct": stream_direct, "chain": stream_chain, "events": EVENTS,
                                "bytes": len(sse)}
        log(f"streaming: direct {stream_direct}, chain {stream_chain}")
        results["paced"] = {"direct": paced_bench(nginx_port, stream_iterations),
                            "chain": paced_bench(client_port, stream_iterations),
                            "events": PACED_EVENTS, "gap_ms": PACED_GAP_S * 1e3}
        log(f"paced stream: {results['paced']}")
        model_iterations = 1 if quick else 5
        results["model_stream"] = {
            "direct": paced_bench(nginx_port, model_iterations, MODEL_EVENTS, MODEL_GAP_S),
            "chain": paced_bench(client_port, model_iterations, MODEL_EVENTS, MODEL_GAP_S),
            "events": MODEL_EVENTS, "gap_ms": MODEL_GAP_S * 1e3}
        log(f"model-paced stream: {results['model_stream']}")

        for proc in chain:
            children.stop(proc)

        serve_port = free_port()
        serve = children.start("serve", [args.tokengo, "serve", "--listen", f"{HOST}:{serve_port}",
                                         "--backend", backend_url, "--data-dir",
                                         os.path.join(workdir, "serve"), *EXIT_ALLOW],
                               workdir, env=env)
        wait_ready(serve_port, serve)
        wrk(serve_port, bodies["small"], 8, 1, "warm-up serve")
        direct_tp = wrk(nginx_port, bodies["small"], 64, seconds, "throughput direct")
        serve_tp = wrk(serve_port, bodies["small"], 64, seconds, "throughput serve")
        children.stop(serve)
        # The chain is compared with the direct run right before it, serve with its own.
        results["throughput"] = {"direct": latency["small_c64"]["direct"],
                                 "chain": latency["small_c64"]["chain"],
                                 "direct_beside_serve": direct_tp, "serve": serve_tp}

        results["serve_startup"] = serve_startup(children, args.tokengo, workdir, backend_url,
                                                 env, startup_runs)
        results["relay_forward"] = relay_forward(children, args.tokengo, args.bench_bin, workdir,
                                                 env, quick)
        results["relay_conns"] = relay_conns(children, args.tokengo, args.bench_bin, workdir,
                                             env, conns)
    except BenchError as error:
        log(f"FAILED: {error}")
        log(f"process logs kept in {workdir}")
        children.stop_all()
        return 1
    except Exception:
        log(f"FAILED with an unexpected error; process logs kept in {workdir}")
        raise
    finally:
        children.stop_all()

    results["machine"]["load_after"] = os.getloadavg()
    table, rows = report(results)
    results["table"] = table.splitlines()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(rows))
    print()
    print(f"TokenGo benchmarks ({'quick smoke run, numbers are rough' if quick else 'full run'}) "
          f"on {results['machine']['cpu']} x{results['machine']['cores']}, load before "
          f"{results['machine']['load_before'][0]:.2f}, after {results['machine']['load_after'][0]:.2f}")
    print(table)
    print(f"\nresults: {args.out} (and the table in Markdown beside it, .md)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
