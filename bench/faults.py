#!/usr/bin/env python3
"""TokenGo fault suite (run through `bench/run --faults`, which installs and builds what it
needs; root only: it creates network namespaces).

Every role runs in its own network namespace: two relays, two exits, the client (and the load
that uses it), the backend, joined by one router namespace through veth pairs. The client's
namespace has a route to the router only, so it cannot reach an exit or the backend at all
(checked at the start); exits reach relays, and the client reaches relays, only through
`tokengo-bench udp-link` forwarders in the router namespace, which add delay, loss and
reordering (this kernel has no `tc netem`); exits reach the backend over TCP routed by the
router, which forwards nothing else. Partitions are iptables rules inside an exit's namespace.

Each scenario starts fresh processes, puts load on the client's local endpoint (workers in the
client's namespace, each request's outcome, exit and latency recorded with timestamps),
injects one fault (SIGKILL, restart on the same identity and port, partition, loss and delay,
key rotation, a kill mid-stream, a rolling restart) and measures what issue 14 asks for. It
prints a table; the targets are reported, never asserted. It fails (non-zero exit) when a
scenario cannot be produced, including when the binary lacks a flag a scenario needs. It
removes its namespaces (and with them every rule and veth it made) on any exit, and removes
leftovers of an earlier run at the start. Standard library only; shares driver.py's helpers.
"""

import argparse
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from driver import BenchError, Children, log  # noqa: E402

PREFIX = "tgfs"  # namespaces tgfs-ROLE, veths tgfsN{r,n}: unique to this suite
ROUTER = f"{PREFIX}-router"
# Role -> link number N: the role's namespace has 10.77.N.2/30, the router 10.77.N.1/30.
ROLES = {"relay1": 1, "relay2": 2, "exit1": 3, "exit2": 4, "client": 5, "backend": 6}
RELAY_PORT = 4433
BACKEND_PORT = 8000
CLIENT_PORT = 8080
# udp-link from a peer (exit or client) to relay K listens on the router's side of the
# peer's link, port LINK_PORT + K.
LINK_PORT = 4400
CHAT_PATH = "/v1/chat/completions"
EXIT_HEADER = "X-Fault-Exit"
PARTITION_S = 10.0


def ns(role):
    return f"{PREFIX}-{role}"


def role_ip(role):
    return f"10.77.{ROLES[role]}.2"


def router_ip(role):
    return f"10.77.{ROLES[role]}.1"


# ------------------------------------------------------------------------------------------------
# Agents: small programs this file runs inside a namespace (`faults.py agent-...`).


class FaultBackend(http.server.BaseHTTPRequestHandler):
    """A chat backend that says which exit called it (the exit's --header): a fixed answer, or
    with "stream": true an SSE stream of `fault_events` events `fault_gap_ms` apart."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self):
        self.answer(200, b'{"status":"ok"}')

    def answer(self, status, data, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        try:
            request = json.loads(self.read_body() or b"{}")
        except ValueError:
            self.answer(400, b'{"error":"not JSON"}')
            return
        exit_name = self.headers.get(EXIT_HEADER, "unknown")
        if not request.get("stream"):
            self.answer(200, json.dumps({
                "id": "chatcmpl-fault", "object": "chat.completion", "model": "fault",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": f"served by {exit_name}"}}],
            }).encode())
            return
        events = int(request.get("fault_events", 20))
        gap = float(request.get("fault_gap_ms", 20)) / 1e3
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for n in range(events + 1):
                if n < events:
                    chunk = {"object": "chat.completion.chunk", "exit": exit_name,
                             "choices": [{"index": 0, "delta": {"content": f" t{n}"}}]}
                    data = f"data: {json.dumps(chunk)}\n\n".encode()
                else:
                    data = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(gap)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass  # the exit went away mid-stream: what the mid-stream scenario does


def agent_backend(args):
    server = http.server.ThreadingHTTPServer((args.host, args.port), FaultBackend)
    server.daemon_threads = True
    print(f"backend listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


def chat(port, timeout, stream=False, events=0, gap_ms=0):
    body = {"model": "fault", "messages": [{"role": "user", "content": "hello"}]}
    if stream:
        body.update(stream=True, fault_events=events, fault_gap_ms=gap_ms)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", CHAT_PATH, body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def api_error_code(data):
    """The `error.code` of an OpenAI-shaped error body, else its first bytes."""
    try:
        return str(json.loads(data)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return data[:80].decode(errors="replace")


def one_request(port, timeout):
    """Outcome of one chat request: ok, the exit that served it or the error."""
    record = {"start": time.time()}
    try:
        conn, response = chat(port, timeout)
        data = response.read()
        conn.close()
        if response.status == 200:
            content = json.loads(data)["choices"][0]["message"]["content"]
            record.update(ok=True, exit=content.removeprefix("served by "))
        else:
            record.update(ok=False, error=f"HTTP {response.status} {api_error_code(data)}")
    except socket.timeout:
        record.update(ok=False, error=f"no answer within {timeout:.0f} s")
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as error:
        record.update(ok=False, error=f"{type(error).__name__}: {error}")
    record["end"] = time.time()
    return record


def agent_load(args):
    """WORKERS sequential request loops, each at most RATE requests/s, until standard input
    closes; then at most DRAIN seconds for requests in flight. One JSON line per request."""
    stop = threading.Event()
    out = threading.Lock()
    in_flight = {}

    def emit(record):
        with out:
            print(json.dumps(record), flush=True)

    def worker(k):
        gap = 1.0 / args.rate
        next_start = time.monotonic()
        while not stop.is_set():
            wait = next_start - time.monotonic()
            if wait > 0 and stop.wait(wait):
                break
            next_start = max(next_start + gap, time.monotonic())
            in_flight[k] = time.time()
            record = one_request(args.port, args.timeout)
            in_flight.pop(k, None)
            emit(record)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(args.workers)]
    for thread in threads:
        thread.start()
    sys.stdin.read()
    stop.set()
    deadline = time.monotonic() + args.drain
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for start in list(in_flight.values()):
        emit({"start": start, "ok": False, "unfinished": True,
              "error": f"still unanswered {args.drain:.0f} s after the load stopped"})
    sys.stdout.flush()
    os._exit(0)


def agent_stream(args):
    """One streamed chat request; prints a line at its first event, then one with the outcome:
    complete, short (a clean end before [DONE]: the failure that must never happen) or error."""
    started = time.time()
    events, done, exit_name = 0, False, None
    try:
        conn, response = chat(args.port, args.timeout, True, args.events, args.gap_ms)
        if response.status != 200:
            raise BenchError(f"HTTP {response.status}: {response.read()[:200]!r}")
        # read1, not readline: http.client's readline turns a chunked body cut short into a
        # clean end of file, which is exactly what must be told apart here.
        pending = b""
        lines = []
        while True:
            if not lines:
                piece = response.read1(65536)
                if not piece:
                    break
                pending += piece
                *complete, pending = pending.split(b"\n")
                lines.extend(complete)
                continue
            line = lines.pop(0)
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: "):
                events += 1
                if exit_name is None:
                    exit_name = json.loads(line[6:]).get("exit", "unknown")
                    print(json.dumps({"first": time.time(), "exit": exit_name}), flush=True)
        conn.close()
        outcome = "complete" if done and events == args.events else "short"
        error = None
    except socket.timeout:
        outcome, error = "error", f"no data for {args.timeout:.0f} s (hung)"
    except (OSError, http.client.HTTPException, ValueError, BenchError) as failure:
        outcome, error = "error", f"{type(failure).__name__}: {failure}"
    print(json.dumps({"outcome": outcome, "events": events, "expected": args.events,
                      "done": done, "error": error, "start": started, "end": time.time()}),
          flush=True)


def agent_probe(args):
    """Exit 0 when `host:port` is unreachable from here (no route or refused), 1 when reached."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.settimeout(2)
            try:
                s.connect((args.host, args.port))
                if kind == socket.SOCK_DGRAM:
                    s.send(b"probe")
                else:
                    print(f"reached {args.host}:{args.port} over TCP")
                    sys.exit(1)
            except OSError as error:
                print(f"{'TCP' if kind == socket.SOCK_STREAM else 'UDP'} to "
                      f"{args.host}:{args.port}: {error}")
                continue
            print(f"sent UDP to {args.host}:{args.port}: a route exists")
            sys.exit(1)
    sys.exit(0)


# ------------------------------------------------------------------------------------------------
# The network


def run(argv, check=True):
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def in_ns(role_ns, *argv):
    return ["ip", "netns", "exec", role_ns, *argv]


class Network:
    """The namespaces, veths, routes and router rules; `down` removes all of them."""

    def up(self):
        self.down()
        run(["ip", "netns", "add", ROUTER])
        run(["ip", "-n", ROUTER, "link", "set", "lo", "up"])
        run(in_ns(ROUTER, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"))
        for role, n in ROLES.items():
            run(["ip", "netns", "add", ns(role)])
            run(["ip", "-n", ns(role), "link", "set", "lo", "up"])
            outer, inner = f"{PREFIX}{n}r", f"{PREFIX}{n}n"
            run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
            run(["ip", "link", "set", outer, "netns", ROUTER])
            run(["ip", "link", "set", inner, "netns", ns(role)])
            run(["ip", "-n", ROUTER, "addr", "add", f"{router_ip(role)}/30", "dev", outer])
            run(["ip", "-n", ns(role), "addr", "add", f"{role_ip(role)}/30", "dev", inner])
            run(["ip", "-n", ROUTER, "link", "set", outer, "up"])
            run(["ip", "-n", ns(role), "link", "set", inner, "up"])
        # Exits and the backend reach each other through the router; nobody else has a route
        # beyond their own link, and the router forwards only that TCP.
        backend_net = f"10.77.{ROLES['backend']}.0/30"
        for exit_role in ("exit1", "exit2"):
            run(["ip", "-n", ns(exit_role), "route", "add", backend_net, "via", router_ip(exit_role)])
            run(["ip", "-n", ns("backend"), "route", "add", f"10.77.{ROLES[exit_role]}.0/30",
                 "via", router_ip("backend")])
        ipt = in_ns(ROUTER, "iptables")
        run([*ipt, "-P", "FORWARD", "DROP"])
        for exit_role in ("exit1", "exit2"):
            run([*ipt, "-A", "FORWARD", "-p", "tcp", "-s", role_ip(exit_role), "-d",
                 role_ip("backend"), "--dport", str(BACKEND_PORT), "-j", "ACCEPT"])
            run([*ipt, "-A", "FORWARD", "-p", "tcp", "-s", role_ip("backend"), "--sport",
                 str(BACKEND_PORT), "-d", role_ip(exit_role), "-j", "ACCEPT"])

    def down(self):
        """Removes every namespace of this suite (their veths, routes and rules go with them)."""
        listed = run(["ip", "netns", "list"], check=False).stdout.split("\n")
        for line in listed:
            name = line.split(" ")[0]
            if name.startswith(f"{PREFIX}-"):
                run(["ip", "netns", "del", name], check=False)

    def check_separation(self, python, me):
        """Fails unless the client's namespace cannot reach the exits or the backend."""
        for target, port in ((role_ip("exit1"), RELAY_PORT), (role_ip("exit2"), RELAY_PORT),
                             (role_ip("backend"), BACKEND_PORT), (role_ip("relay1"), RELAY_PORT)):
            probe = run(in_ns(ns("client"), python, me, "agent-probe", "--host", target,
                              "--port", str(port)), check=False)
            if probe.returncode != 0:
                raise BenchError(f"the client's namespace reaches {target}: {probe.stdout.strip()}")
        log("separation checked: the client's namespace has no route to the exits, the backend "
            "or the relays (only to udp-link forwarders in the router)")

    @staticmethod
    def partition(exit_role, on):
        """Drops (or stops dropping) all UDP between an exit and the router's forwarders."""
        action = "-I" if on else "-D"
        ipt = in_ns(ns(exit_role), "iptables")
        run([*ipt, action, "OUTPUT", "-p", "udp", "-d", router_ip(exit_role), "-j", "DROP"])
        run([*ipt, action, "INPUT", "-p", "udp", "-s", router_ip(exit_role), "-j", "DROP"])

    @staticmethod
    def tcp_loss(role, probability):
        """Random loss of TCP both ways in a role's namespace (iptables statistic)."""
        ipt = in_ns(ns(role), "iptables")
        for chain in ("INPUT", "OUTPUT"):
            run([*ipt, "-A", chain, "-p", "tcp", "-m", "statistic", "--mode", "random",
                 "--probability", str(probability), "-j", "DROP"])


# ------------------------------------------------------------------------------------------------
# One scenario's processes


class Load:
    """The load agent in the client's namespace and the records it prints."""

    def __init__(self, suite, workers, rate, drain):
        self.records = []
        self.lock = threading.Lock()
        self.drain = drain
        argv = in_ns(ns("client"), suite.python, suite.me, "agent-load", "--port", str(CLIENT_PORT),
                     "--workers", str(workers), "--rate", str(rate), "--drain", str(drain),
                     "--timeout", str(suite.request_timeout))
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        for line in self.popen.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.records.append(record)

    def snapshot(self):
        with self.lock:
            return list(self.records)

    def wait_for(self, what, condition, timeout):
        """Polls the records until `condition(records)` is true; BenchError after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self.snapshot()):
                return
            if self.popen.poll() is not None:
                raise BenchError(f"the load agent exited ({self.popen.returncode})")
            time.sleep(0.05)
        recent = [r.get("error") or r.get("exit") for r in self.snapshot()[-5:]]
        raise BenchError(f"{what} did not happen within {timeout:.0f} s (last outcomes: {recent})")

    def wait_until(self, what, condition, timeout):
        """Like wait_for, but returns False instead of failing at the deadline."""
        try:
            self.wait_for(what, condition, timeout)
            return True
        except BenchError:
            if self.popen.poll() is not None:
                raise
            return False

    def stop(self):
        """Stops sending, waits for requests in flight (at most the drain time); all records."""
        if self.popen.poll() is None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
            try:
                self.popen.wait(timeout=self.drain + 30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.thread.join(timeout=10)
        return self.snapshot()


def served_by(*exits, after=0.0):
    """A condition: each of `exits` served a request that started after `after`."""
    return lambda records: all(any(r.get("ok") and r.get("exit") == e and r["start"] >= after
                                   for r in records) for e in exits)


class Scenario:
    """Processes of one scenario (in their namespaces), stopped by PID when it ends."""

    def __init__(self, suite, name):
        self.suite = suite
        self.name = name
        self.workdir = os.path.join(suite.workdir, name)
        os.makedirs(self.workdir)
        self.children = Children()
        self.relays = {}  # role -> (Proc, PeerId)
        self.procs = {}
        self.loads = []

    def start(self, name, role, argv):
        proc = self.children.start(name, in_ns(ns(role), *argv), self.workdir, env=self.suite.env)
        self.procs[name] = proc
        return proc

    def relay(self, role, name=None):
        """Starts (or restarts, same identity and port) a relay; waits until it listens."""
        proc = self.start(name or role, role, [
            self.suite.tokengo, "relay", "--listen", f"{role_ip(role)}:{RELAY_PORT}",
            "--data-dir", os.path.join(self.workdir, role)])
        peer = proc.wait_line("relay listening on ").split("/p2p/")[-1]
        self.relays[role] = (proc, peer)
        return proc

    def link(self, peer_role, relay_role, delay_ms=0, loss=0.0):
        """The udp-link from a peer's link to a relay; its multiaddr for the peer."""
        port = LINK_PORT + ROLES[relay_role]
        proc = self.start(f"link-{peer_role}-{relay_role}", "router", [
            self.suite.bench_bin, "udp-link", "--listen", f"{router_ip(peer_role)}:{port}",
            "--to", f"{role_ip(relay_role)}:{RELAY_PORT}", "--delay-ms", str(delay_ms),
            "--loss", str(loss)])
        proc.wait_line("udp-link listening on ")
        return f"/ip4/{router_ip(peer_role)}/udp/{port}/quic-v1/p2p/{self.relays[relay_role][1]}"

    def exit(self, role, relay_addrs, extra=()):
        """Starts an exit registered with each relay address; waits for one registration."""
        relay_flags = [flag for addr in relay_addrs for flag in ("--relay", addr)]
        proc = self.start(role, role, [
            self.suite.tokengo, "exit", *relay_flags,
            "--backend", f"http://{role_ip('backend')}:{BACKEND_PORT}",
            "--header", f"{EXIT_HEADER}: {role}",
            "--data-dir", os.path.join(self.workdir, role), *extra])
        proc.wait_line(f"exit ")
        return proc

    def client(self, relay_addrs):
        return self.start("client", "client", [
            self.suite.tokengo, "client", *[f for a in relay_addrs for f in ("--relay", a)],
            "--listen", f"127.0.0.1:{CLIENT_PORT}",
            "--data-dir", os.path.join(self.workdir, "client")])

    def load(self, workers=8, rate=2.5, drain=None):
        load = Load(self.suite, workers, rate, drain or self.suite.request_timeout + 5)
        self.loads.append(load)
        return load

    def topology(self, exits=("exit1", "exit2"), relays=("relay1",), delay_ms=0, loss=0.0,
                 exit_extra=()):
        """Relays, links, exits (each with every relay) and the client (with every relay)."""
        for relay in relays:
            self.relay(relay)
        for exit_role in exits:
            addrs = [self.link(exit_role, r, delay_ms, loss) for r in relays]
            self.exit(exit_role, addrs, exit_extra)
        self.client([self.link("client", r, delay_ms, loss) for r in relays])

    def kill(self, name):
        """SIGKILL (a crash); returns the time it was sent."""
        proc = self.procs[name]
        at = time.time()
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait()
        return at

    def link_counts(self):
        """Stops the links and sums their datagram counts."""
        total = {"forwarded": 0, "dropped": 0, "reordered": 0}
        for name, proc in list(self.procs.items()):
            if name.startswith("link-") and proc.popen.poll() is None:
                self.children.stop(proc)
                with open(proc.out_path) as f:
                    for line in f:
                        if line.startswith("{"):
                            for key, value in json.loads(line).items():
                                total[key] += value
        return total

    def close(self):
        for load in self.loads:
            if load.popen.poll() is None:
                load.popen.kill()
                load.popen.wait()
        self.children.stop_all()


# ------------------------------------------------------------------------------------------------
# Figures


def pct(values, q):
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summary(records):
    """ok/total, failures, p50/p99/max latency (unfinished count as failures, not latency)."""
    done = [r for r in records if not r.get("unfinished")]
    latencies = [r["end"] - r["start"] for r in done]
    failed = [r for r in records if not r.get("ok")]
    return {"requests": len(records), "failed": len(failed),
            "unfinished": len(records) - len(done),
            "p50_s": pct(latencies, 50), "p99_s": pct(latencies, 99),
            "max_s": max(latencies) if latencies else None,
            "errors": sorted({r.get("error", "")[:120] for r in failed})[:5]}


def outcomes(records, since):
    """Requests grouped by outcome: "2 ok via exit2 by +0.1 s, 2 HTTP 503 ... by +30.1 s"."""
    groups = {}
    for r in records:
        key = ("unanswered at the end" if r.get("unfinished")
               else f"ok via {r['exit']}" if r.get("ok") else r["error"][:60])
        groups.setdefault(key, []).append(None if r.get("unfinished") else r["end"] - since)
    parts = []
    for key, ends in groups.items():
        known = [e for e in ends if e is not None]
        parts.append(f"{len(ends)} {key}" + (f" by +{max(known):.1f} s" if known else ""))
    return ", ".join(parts) or "none"


def errors(stats):
    """The first distinct errors, short."""
    return "; ".join(e[:70] for e in stats["errors"][:2])


def secs(value):
    return "n/a" if value is None else f"{value:.2f} s"


# ------------------------------------------------------------------------------------------------
# Scenarios: each returns (figures dict, measured text, target text, met bool).


def exit_crash(sc, quick):
    sc.topology()
    load = sc.load()
    load.wait_for("both exits serving", served_by("exit1", "exit2"), 60)
    crash = sc.kill("exit1")
    time.sleep(5 if quick else 20)
    records = load.stop()
    after = [r for r in records if r["start"] >= crash]
    in_flight = [r for r in records if r["start"] < crash and (r.get("unfinished") or r["end"] > crash)]
    touched = after + in_flight
    lat = [r["end"] - r["start"] for r in touched if not r.get("unfinished")]
    stats = summary(after)
    figures = {"after_crash": stats, "in_flight": outcomes(in_flight, crash),
               "max_latency_s": max(lat) if lat else None,
               "unanswered": sum(1 for r in touched if r.get("unfinished"))}
    # A clear error is an HTTP error answer, not a hang or a dropped connection.
    clear = all(r.get("ok") or r.get("error", "").startswith("HTTP ") for r in in_flight)
    met = stats["failed"] == 0 and not figures["unanswered"] and clear and (figures["max_latency_s"] or 0) <= 3
    measured = (f"after the crash {stats['failed']} of {stats['requests']} failed"
                f"{' (' + errors(stats) + ')' if stats['errors'] else ''}; "
                f"in flight at the crash: {figures['in_flight']}; "
                f"max latency {secs(figures['max_latency_s'])}"
                f"{', ' + str(figures['unanswered']) + ' unanswered' if figures['unanswered'] else ''}")
    return figures, stats, measured, "0 failed after; in-flight ok or clear error; max <= 3 s", met


def relay_restart(sc, quick):
    sc.topology()
    load = sc.load()
    load.wait_for("both exits serving", served_by("exit1", "exit2"), 60)
    crash = sc.kill("relay1")
    time.sleep(1)
    sc.relay("relay1", name="relay1-restarted")
    up = time.time()
    cap = 45 if quick else 60
    back = load.wait_until("service back", lambda rs: any(
        r.get("ok") and r["start"] >= up for r in rs), cap)
    time.sleep(1)
    records = load.stop()
    firsts = [r["end"] - up for r in records if r.get("ok") and r["start"] >= up]
    back_s = min(firsts) if back and firsts else None
    stats = summary([r for r in records if r["start"] >= crash or r.get("unfinished") or r["end"] > crash])
    figures = {"back_after_up_s": back_s, "since_crash": stats, "cap_s": cap}
    measured = (f"service back {secs(back_s)} after the relay was up" if back_s is not None
                else f"service NOT back {cap} s after the relay was up")
    measured += f"; {stats['failed']} of {stats['requests']} requests since the crash failed"
    return figures, stats, measured, "back <= 2 s after the relay is up", back_s is not None and back_s <= 2


def partition(sc, quick):
    sc.topology()
    load = sc.load()
    load.wait_for("both exits serving", served_by("exit1", "exit2"), 60)
    start = time.time()
    Network.partition("exit1", True)
    time.sleep(PARTITION_S)
    Network.partition("exit1", False)
    heal = time.time()
    cap = 25 if quick else 40
    back = load.wait_until("exit1 back", served_by("exit1", after=heal), cap)
    records = load.stop()
    during = sorted((r for r in records if start <= r["start"] < heal), key=lambda r: r["start"])
    # Traffic has moved once every request from then until the heal succeeds via exit2.
    moved_s = None
    good_tail = []
    for r in reversed(during):
        if r.get("ok") and r.get("exit") == "exit2" and r["end"] < heal + 1:
            good_tail.append(r)
        else:
            break
    if good_tail and good_tail[0]["start"] >= heal - 1.5:
        moved_s = good_tail[-1]["start"] - start
    back_s = None
    if back:
        back_s = min(r["end"] for r in records if r.get("ok") and r.get("exit") == "exit1"
                     and r["start"] >= heal) - heal
    stats = summary([r for r in records if r["start"] >= start or r.get("unfinished") or r["end"] > start])
    stuck = sum(1 for r in during if r.get("exit") == "exit1" or r.get("unfinished"))
    figures = {"moved_s": moved_s, "back_after_heal_s": back_s, "since_partition": stats,
               "requests_during": len(during), "to_exit1_or_stuck_during": stuck, "cap_s": cap}
    measured = ((f"traffic on exit2 only from +{moved_s:.1f} s" if moved_s is not None
                 else f"traffic NOT moved within the {PARTITION_S:.0f} s partition")
                + f" ({stuck} of {len(during)} requests started during it went to exit1 or hung); "
                + (f"exit1 back {back_s:.1f} s after the heal" if back_s is not None
                   else f"exit1 NOT back {cap} s after the heal")
                + f"; {stats['failed']} failed, max latency {secs(stats['max_s'])}")
    met = moved_s is not None and moved_s <= 3 and back_s is not None and back_s <= 3
    return figures, stats, measured, "moved <= 3 s; back <= 3 s after heal", met


def loss_delay(sc, quick):
    Network.tcp_loss("backend", 0.05)
    sc.topology(delay_ms=50, loss=0.05)
    load = sc.load()
    load.wait_for("a first answer through the lossy links", lambda rs: any(r.get("ok") for r in rs),
                  90)
    begin = time.time()
    time.sleep(10 if quick else 30)
    records = [r for r in load.stop() if r["start"] >= begin]
    links = sc.link_counts()
    stats = summary(records)
    seen = links["dropped"] / max(1, links["dropped"] + links["forwarded"])
    figures = {"stats": stats, "links": links, "observed_udp_loss": seen}
    ok = stats["requests"] - stats["failed"]
    measured = (f"{ok} of {stats['requests']} ok ({100 * ok / max(1, stats['requests']):.1f} %), "
                f"p50 {secs(stats['p50_s'])}, p99 {secs(stats['p99_s'])}, max {secs(stats['max_s'])}; "
                f"links dropped {100 * seen:.1f} % of {links['dropped'] + links['forwarded']} datagrams")
    return figures, stats, measured, "every request succeeds; p99 reported", stats["failed"] == 0


def key_rotation(sc, quick):
    help_text = run([sc.suite.tokengo, "exit", "--help"]).stdout
    if "--key-rotation-hours" not in help_text:
        raise BenchError("this tokengo has no `exit --key-rotation-hours` flag (issue 14 item 5 "
                         "is not in this build): scenario not produced")
    period = 4.0 if quick else 10.0
    sc.topology(exits=("exit1",), exit_extra=("--key-rotation-hours", f"{period / 3600:.8f}"))
    load = sc.load()
    load.wait_for("exit1 serving", served_by("exit1"), 60)
    begin = time.time()
    time.sleep(2.5 * period)
    records = [r for r in load.stop() if r["start"] >= begin]
    stats = summary(records)
    figures = {"rotation_period_s": period, "stats": stats}
    measured = (f"rotation every {period:.0f} s for {2.5 * period:.0f} s: {stats['failed']} of "
                f"{stats['requests']} failed"
                f"{' (' + errors(stats) + ')' if stats['errors'] else ''}, "
                f"max latency {secs(stats['max_s'])}")
    return figures, stats, measured, "0 failed", stats["failed"] == 0


def mid_stream(sc, quick):
    sc.topology()
    probe = sc.load(workers=1, rate=5)
    probe.wait_for("both exits serving", served_by("exit1", "exit2"), 60)
    probe.stop()
    events = 200
    stream = subprocess.Popen(
        in_ns(ns("client"), sc.suite.python, sc.suite.me, "agent-stream", "--port", str(CLIENT_PORT),
              "--events", str(events), "--gap-ms", "25", "--timeout", str(sc.suite.request_timeout)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(stream.stdout.readline() or "{}")
        if "first" not in first:
            raise BenchError(f"the stream never started: {first} {stream.stderr.read()[-400:]}")
        killed = sc.kill(first["exit"])
        out, err = stream.communicate(timeout=sc.suite.request_timeout + 30)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if not lines or "outcome" not in lines[-1]:
        raise BenchError(f"the stream agent printed no outcome: {out[-400:]} {err[-400:]}")
    end = lines[-1]
    figures = {"killed": first["exit"], **end, "ended_after_kill_s": end["end"] - killed}
    what = {"error": "ended with an ERROR", "short": "ended CLEANLY but SHORT (a false success)",
            "complete": "completed"}[end["outcome"]]
    measured = (f"{first['exit']} killed after the first event; the stream {what} "
                f"{end['end'] - killed:.1f} s later, {end['events']} of {events} events"
                f"{' (' + end['error'][:90] + ')' if end.get('error') else ''}")
    stats = {"requests": 1, "failed": int(end["outcome"] != "complete"), "p50_s": None,
             "p99_s": None, "max_s": end["end"] - end["start"]}
    return figures, stats, measured, "ends with an error, never a short success", end["outcome"] == "error"


def rolling_restart(sc, quick):
    sc.topology(relays=("relay1", "relay2"))
    load = sc.load()
    load.wait_for("both exits serving", served_by("exit1", "exit2"), 60)
    begin = time.time()
    settle = 3 if quick else 5
    timings = {}
    for relay in ("relay1", "relay2"):
        proc, _ = sc.relays[relay]
        stopping = time.time()
        sc.children.stop(proc)  # SIGTERM: the relay drains, KILL after 10 s
        timings[f"{relay}_stop_s"] = time.time() - stopping
        sc.relay(relay, name=f"{relay}-restarted")
        time.sleep(settle)
    time.sleep(settle)
    records = [r for r in load.stop() if r["start"] >= begin or r.get("unfinished") or r["end"] > begin]
    stats = summary(records)
    figures = {"stats": stats, **timings, "settle_s": settle}
    measured = (f"relay1 then relay2 restarted ({settle} s apart): {stats['failed']} of "
                f"{stats['requests']} failed"
                f"{' (' + errors(stats) + ')' if stats['errors'] else ''}, "
                f"max latency {secs(stats['max_s'])}")
    return figures, stats, measured, "0 failed", stats["failed"] == 0


SCENARIOS = [
    ("exit-crash", "SIGKILL of an exit under load (2 exits, 1 relay)", exit_crash),
    ("relay-restart", "SIGKILL of the relay, restart 1 s later, same identity and port", relay_restart),
    ("partition", f"exit1 <-> relay partitioned {PARTITION_S:.0f} s (iptables)", partition),
    ("loss-delay", "5 % loss + 50 ms delay each way on every link", loss_delay),
    ("key-rotation", "two OHTTP key rotations under load, one exit", key_rotation),
    ("mid-stream", "the exit serving a stream is SIGKILLed mid-way", mid_stream),
    ("rolling-restart", "relay1 then relay2 restarted (SIGTERM), exits on both", rolling_restart),
]


# ------------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, args):
        self.tokengo = os.path.abspath(args.tokengo)
        self.bench_bin = os.path.abspath(args.bench_bin)
        self.python = sys.executable
        self.me = os.path.abspath(__file__)
        self.workdir = tempfile.mkdtemp(prefix="tokengo-faults.")
        os.chmod(self.workdir, 0o755)
        self.env = dict(os.environ)
        self.env.setdefault("RUST_LOG", "info")
        # Longest a load request waits: beyond the nodes' 30 s QUIC idle timeout, so a hang
        # shows as its real length.
        self.request_timeout = 45


def report(rows):
    """The table (figures per column, what was measured below it) and its Markdown."""
    header = ("scenario", "requests", "failed", "p50", "p99", "max", "target met")
    lines, notes, md_rows = [], [], []
    for r in rows:
        s = r.get("stats") or {}
        cells = (r["scenario"], str(s.get("requests", "-")), str(s.get("failed", "-")),
                 secs(s.get("p50_s")) if s else "-", secs(s.get("p99_s")) if s else "-",
                 secs(s.get("max_s")) if s else "-", r["verdict"])
        lines.append(cells)
        notes.append(f"{r['scenario']}: {r['measured']} (target: {r['target']})")
        md_rows.append(cells[:6] + (r["measured"], r["target"], r["verdict"]))
    widths = [max(len(row[i]) for row in lines + [header]) for i in range(len(header))]
    text = [" | ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
            for row in [header, tuple("-" * w for w in widths)] + lines]
    md_header = header[:6] + ("measured", "target", "target met")
    md = ["| " + " | ".join(md_header) + " |", "|" + "---|" * len(md_header)]
    md += ["| " + " | ".join(v.replace("|", "/") for v in row) + " |" for row in md_rows]
    return "\n".join(text + [""] + notes), "\n".join(md) + "\n"


def main_suite(argv):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter phases (CI)")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--tokengo", required=True)
    parser.add_argument("--bench-bin", required=True)
    parser.add_argument("--only", action="append", choices=[s[0] for s in SCENARIOS],
                        help="run only this scenario (repeatable)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        log("error: the fault suite creates network namespaces: run it as root")
        return 1
    suite = Suite(args)
    network = Network()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows, failures = [], 0
    backend = None
    try:
        network.up()
        backend = subprocess.Popen(
            in_ns(ns("backend"), suite.python, suite.me, "agent-backend", "--host",
                  role_ip("backend"), "--port", str(BACKEND_PORT)),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if not (backend.stdout.readline() or "").startswith("backend listening"):
            raise BenchError("the backend agent did not start")
        network.check_separation(suite.python, suite.me)
        for name, what, fn in SCENARIOS:
            if args.only and name not in args.only:
                continue
            log(f"scenario {name}: {what}")
            sc = Scenario(suite, name)
            started = time.time()
            try:
                figures, stats, measured, target, met = fn(sc, args.quick)
                row = {"scenario": name, "what": what, "figures": figures, "stats": stats,
                       "measured": measured, "target": target,
                       "verdict": "met" if met else "MISSED"}
            except BenchError as error:
                failures += 1
                row = {"scenario": name, "what": what, "stats": None, "figures": None,
                       "measured": f"NOT PRODUCED: {str(error).strip().splitlines()[0]}"[:200],
                       "target": "-",
                       "verdict": "FAILED"}
                log(f"scenario {name} FAILED: {error}")
                log(f"its process logs are kept in {sc.workdir}")
            finally:
                sc.close()
                # Rules of a scenario live in role namespaces; start each scenario clean.
                for role in ROLES:
                    run(in_ns(ns(role), "iptables", "-F"), check=False)
            row["seconds"] = round(time.time() - started, 1)
            log(f"{name}: {row['measured']} [{row['verdict']}]")
            rows.append(row)
    except BenchError as error:
        log(f"FAILED: {error}")
        log(f"process logs kept in {suite.workdir}")
        return 1
    finally:
        if backend is not None and backend.poll() is None:
            backend.kill()
            backend.wait()
        network.down()

    table, markdown = report(rows)
    results = {"quick": args.quick, "rows": rows, "table": table.splitlines(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown)
    print()
    print(f"TokenGo under faults ({'quick smoke run, ' if args.quick else ''}each role in its own "
          f"network namespace; targets from issue 14, reported, not asserted)")
    print(table)
    print(f"\nresults: {args.out} (and the table in Markdown beside it, .md)")
    if failures:
        log(f"{failures} scenario(s) could not be produced (see FAILED rows)")
        return 1
    return 0


def main():
    agents = {"agent-backend": agent_backend, "agent-load": agent_load,
              "agent-stream": agent_stream, "agent-probe": agent_probe}
    if len(sys.argv) > 1 and sys.argv[1] in agents:
        parser = argparse.ArgumentParser(prog=f"faults.py {sys.argv[1]}")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--workers", type=int, default=4)
        parser.add_argument("--rate", type=float, default=5.0)
        parser.add_argument("--drain", type=float, default=50.0)
        parser.add_argument("--timeout", type=float, default=45.0)
        parser.add_argument("--events", type=int, default=200)
        parser.add_argument("--gap-ms", type=float, default=25.0)
        return agents[sys.argv[1]](parser.parse_args(sys.argv[2:]))
    return main_suite(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
