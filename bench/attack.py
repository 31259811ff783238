#!/usr/bin/env python3
"""TokenGo attack harness (run through `bench/run --attack`, which installs and builds what it
needs). Everything on 127.0.0.1: nginx as the backend, release `tokengo relay`, `exit` and
`client` processes, and well-behaved clients (wrk through the client) sending chat requests
while `tokengo-bench attack` abuses the relay and its exit: stalled readers, stream floods,
registration floods, slow uploads, garbage and replayed requests.

For each attack it prints the good clients' p50/p99 next to the run without attack, their
failures, and the relay's and exit's peak RSS. The targets (no failures, p99 within 2x of the
unattacked run plus 5 ms, relay under 512 MiB) are reported, never asserted: it fails only
when a figure cannot be produced. Standard library only; shares its helpers with driver.py.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import driver  # noqa: E402  (the benchmark driver's processes, backend and wrk script)

from driver import HOST, BenchError, Children, log  # noqa: E402

# (kind, connections, streams per connection): the issue's "4 connections x 256 streams"
# for the flood, fewer elsewhere (each stalled stream holds a large answer).
ATTACKS = [
    ("stall", 2, 32),
    ("flood", 4, 256),
    ("slow-upload", 4, 128),
    ("garbage", 2, 32),
    ("replay", 2, 32),
    # Last: the exits it registers stay in the good client's cached list until it refreshes.
    ("register", 1, 16),
]
# Each attack comes from a loopback address of its own (127.0.0.10, .11, ...), never the good
# clients' 127.0.0.1, as an attacker on a network has its own address.
ATTACKER_FIRST_ADDRESS = 10
# The attacker runs at this niceness: on one 2-core machine its own CPU would otherwise be
# taken from the system under test, which a real attacker's (on its own machines) is not.
ATTACKER_NICE = 19
TARGET_P99_RATIO = 2.0
TARGET_P99_SLACK_MS = 5.0
TARGET_RELAY_RSS_MIB = 512
# The answer a stalled reader asks for (served by nginx at /v1/embeddings).
BIG_BYTES = 4 << 20


def add_big_answer(conf_path, workdir):
    """Adds `POST /v1/embeddings` answering BIG_BYTES of JSON to the driver's nginx config
    (nginx serves static files to GET only; the 405 is turned into the file)."""
    root = os.path.join(workdir, "www")
    with open(os.path.join(root, "big.json"), "wb") as f:
        f.write(b'{"data":"' + b"x" * (BIG_BYTES - 11) + b'"}')
    os.chmod(os.path.join(root, "big.json"), 0o644)
    with open(conf_path) as f:
        conf = f.read()
    location = (f"        location = /v1/embeddings {{\n"
                f"            root {root};\n"
                f"            default_type application/json;\n"
                f"            try_files /big.json =404;\n"
                f"            error_page 405 =200 /v1/embeddings;\n"
                f"        }}\n")
    marker = "        location / { return 404; }"
    if marker not in conf:
        raise BenchError("the driver's nginx config changed: no catch-all location")
    with open(conf_path, "w") as f:
        f.write(conf.replace(marker, location + marker))


class PeakRss:
    """Samples VmRSS of some processes every 50 ms; keeps the largest per process."""

    def __init__(self, procs):
        self.procs = procs
        self.peak = {p.name: 0 for p in procs}
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop_flag.is_set():
            for proc in self.procs:
                try:
                    self.peak[proc.name] = max(self.peak[proc.name], proc.rss_kib())
                except (OSError, BenchError):
                    pass
            self.stop_flag.wait(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        self.thread.join()


def good_clients(port, script, seconds):
    """wrk with 4 connections through the client; failures are counted, not raised."""
    argv = ["wrk", "-t1", "-c4", f"-d{seconds}s", "--latency", "--timeout", "10s", "-s", script,
            f"http://{HOST}:{port}{driver.CHAT_PATH}"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^WRKJSON (\{.*\})$", run.stdout, re.M)
    if run.returncode != 0 or not match:
        raise BenchError(f"wrk failed ({run.returncode}): {run.stdout}\n{run.stderr}")
    result = json.loads(match.group(1))
    kinds = ("connect", "read", "write", "status", "timeout")
    result["failures"] = sum(result[k] for k in kinds)
    # Which kind of failure, for the log: wrk's "status" is an HTTP status above 399.
    result["failure_kinds"] = {k: result[k] for k in kinds if result[k]}
    if result["requests"] < 1:
        # A figure too: nobody was served. Latencies do not exist.
        log(f"the good clients completed no request: {result}")
        result["p50_us"] = result["p99_us"] = None
    return result


def phase(name, args, chain, client_port, script, relay_addr, exit_id, seconds, ramp, nginx):
    """One measurement: the good clients for `seconds`, with attack `name` running (from
    `ramp` seconds before) unless it is None. Also the CPU seconds the system under test
    (relay, exit, client, nginx) and the attacker spent over the phase."""
    relay, exit_, client = chain
    attacker = None
    kind = next((a for a in ATTACKS if a[0] == name), None)
    sut_cpu = lambda: (sum(p.cpu_seconds() for p in chain)  # noqa: E731
                       + driver.process_tree_cpu_seconds(nginx.pid))
    cpu_before = sut_cpu()
    attacker_cpu = 0.0
    with PeakRss([relay, exit_]) as rss:
        if kind:
            _, connections, streams = kind
            source = f"127.0.0.{ATTACKER_FIRST_ADDRESS + [a[0] for a in ATTACKS].index(name)}"
            attacker = subprocess.Popen(
                [args.bench_bin, "attack", "--relay", relay_addr, "--exit", exit_id, "--kind", name,
                 "--seconds", str(ramp + seconds + 1), "--connections", str(connections),
                 "--streams", str(streams), "--bind", source],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                preexec_fn=lambda: os.nice(args.attacker_nice))
            time.sleep(ramp)
        good = good_clients(client_port, script, seconds)
        answers = {}
        if attacker:
            # wrk is reaped already: what children used from here on is the attacker's.
            reaped_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            try:
                out, err = attacker.communicate(timeout=ramp + 30)
            except subprocess.TimeoutExpired:
                attacker.kill()
                out, err = attacker.communicate()
            reaped_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            attacker_cpu = ((reaped_after.ru_utime + reaped_after.ru_stime)
                            - (reaped_before.ru_utime + reaped_before.ru_stime))
            if attacker.returncode != 0:
                raise BenchError(f"attacker {name} failed ({attacker.returncode}): {err[-2000:]}")
            answers = json.loads(out.strip().splitlines()[-1])["answers"]
    cpu = sut_cpu() - cpu_before
    for proc in chain:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} died during {name or 'baseline'}: {proc.tail()}")
    ms = (lambda us: None if us is None else us / 1e3)
    result = {"attack": name or "none", "p50_ms": ms(good["p50_us"]),
              "p99_ms": ms(good["p99_us"]), "requests": good["requests"],
              "failures": good["failures"], "failure_kinds": good["failure_kinds"],
              "relay_peak_rss_mib": rss.peak["relay"] / 1024,
              "exit_peak_rss_mib": rss.peak["exit"] / 1024, "attacker_answers": answers,
              "good_req_per_s": good["requests"] / seconds, "sut_cpu_s": cpu,
              "attacker_cpu_s": attacker_cpu}
    log(f"{result['attack']}: good p50 {fmt_ms(result['p50_ms'])} p99 {fmt_ms(result['p99_ms'])}, "
        f"{result['requests']} requests, {result['failures']} failures "
        f"{result['failure_kinds'] or ''}; relay "
        f"{result['relay_peak_rss_mib']:.0f} MiB, exit {result['exit_peak_rss_mib']:.0f} MiB; "
        f"CPU s: system {cpu:.1f}, attacker {attacker_cpu:.1f}; attacker {answers}")
    return result


def fmt_ms(value):
    return "none completed" if value is None else f"{value:.2f} ms"


def report(baseline, results):
    rows = []
    base_p99 = baseline["p99_ms"] or 0.0
    for r in [baseline] + results:
        limit = base_p99 * TARGET_P99_RATIO + TARGET_P99_SLACK_MS
        met = (r["failures"] == 0 and r["p99_ms"] is not None and r["p99_ms"] <= limit
               and r["relay_peak_rss_mib"] < TARGET_RELAY_RSS_MIB)
        answers = ", ".join(f"{k} {v}" for k, v in sorted(r["attacker_answers"].items()))
        ratio = "n/a" if r["p99_ms"] is None or not base_p99 else f"{r['p99_ms'] / base_p99:.2f}x"
        failures = str(r["failures"]) if r["requests"] else f"{r['failures']} (none served)"
        rows.append((r["attack"], fmt_ms(r["p50_ms"]), fmt_ms(r["p99_ms"]), ratio, failures,
                     f"{r['good_req_per_s']:.0f}", f"{r['relay_peak_rss_mib']:.0f} MiB",
                     f"{r['exit_peak_rss_mib']:.0f} MiB", f"{r['sut_cpu_s']:.1f} s",
                     f"{r['attacker_cpu_s']:.1f} s", "met" if met else "MISSED", answers))
    header = ("attack", "good p50", "good p99", "p99 vs none", "good failures", "good req/s",
              "relay peak RSS", "exit peak RSS", "system CPU", "attacker CPU", "targets",
              "what the attacker got")
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
             for row in [header, tuple("-" * w for w in widths)] + rows]
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines), "\n".join(markdown) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 s per attack (CI)")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--tokengo", required=True)
    parser.add_argument("--bench-bin", required=True)
    parser.add_argument("--attacker-nice", type=int, default=ATTACKER_NICE,
                        help=f"niceness of the attacker process (default {ATTACKER_NICE})")
    parser.add_argument("--only", action="append", choices=[a[0] for a in ATTACKS],
                        help="run only this attack (repeatable)")
    args = parser.parse_args()
    seconds, ramp = (4, 2) if args.quick else (20, 3)

    children = Children()
    workdir = tempfile.mkdtemp(prefix="tokengo-attack.")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = dict(os.environ)
    # A registration flood logs every refusal at info; keep the logs small.
    env.setdefault("RUST_LOG", "warn")
    results = {"quick": args.quick, "seconds_per_attack": seconds, "machine": driver.machine_info(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        paced = driver.start_paced()
        nginx_port = driver.free_port()
        conf, _ = driver.write_backend(workdir, nginx_port, paced.server_address[1])
        add_big_answer(conf, workdir)
        nginx = children.start("nginx", ["nginx", "-p", workdir, "-c", conf, "-e",
                                         os.path.join(workdir, "nginx-error.log")], workdir)
        driver.wait_ready(nginx_port, nginx)
        client_port = driver.free_port()
        chain = driver.start_chain(children, args.tokengo, workdir, f"http://{HOST}:{nginx_port}",
                                   client_port, env)
        relay_addr = chain[0].wait_line("relay listening on ").split()[-1]
        # "exit PEERID registered with relay ...": the registration flood adds exits of its
        # own, so every attacker aims at this one.
        exit_id = chain[1].wait_line("exit ").split()[1]
        body = os.path.join(workdir, "body.json")
        with open(body, "wb") as f:
            f.write(driver.chat_body(64))
        script = os.path.join(workdir, "post.lua")
        with open(script, "w") as f:
            f.write(driver.WRK_LUA.format(body=body))
        good_clients(client_port, script, 1)  # warm-up

        baseline = phase(None, args, chain, client_port, script, relay_addr, exit_id, seconds, ramp,
                         nginx)
        attacked = [phase(name, args, chain, client_port, script, relay_addr, exit_id, seconds,
                          ramp, nginx)
                    for name, _, _ in ATTACKS if not args.only or name in args.only]
        after = phase(None, args, chain, client_port, script, relay_addr, exit_id, seconds, ramp,
                         nginx)
        after["attack"] = "none, after all attacks"
        attacked.append(after)
        results["baseline"] = baseline
        results["attacks"] = attacked
        results["relay_vm_hwm_kib"] = vm_hwm(chain[0].pid)
        results["exit_vm_hwm_kib"] = vm_hwm(chain[1].pid)
    except BenchError as error:
        log(f"FAILED: {error}")
        log(f"process logs kept in {workdir}")
        children.stop_all()
        return 1
    finally:
        children.stop_all()

    table, markdown = report(results["baseline"], results["attacks"])
    results["table"] = table.splitlines()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown)
    print()
    print(f"TokenGo under attack ({'quick smoke run, ' if args.quick else ''}{seconds} s per attack, "
          f"4 good connections) on {results['machine']['cpu']} x{results['machine']['cores']}; "
          f"targets: no good failures, p99 <= {TARGET_P99_RATIO:g}x none + {TARGET_P99_SLACK_MS:g} ms, "
          f"relay < {TARGET_RELAY_RSS_MIB} MiB (reported, not asserted)")
    print(table)
    print(f"relay VmHWM {results['relay_vm_hwm_kib'] / 1024:.0f} MiB, "
          f"exit VmHWM {results['exit_vm_hwm_kib'] / 1024:.0f} MiB over the whole run")
    print(f"\nresults: {args.out} (and the table in Markdown beside it, .md)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise BenchError(f"no VmHWM for {pid}")


if __name__ == "__main__":
    sys.exit(main())
