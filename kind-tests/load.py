#!/usr/bin/env python3
"""Requests against an OpenAI-compatible endpoint (a `tokengo client`), standard library only.

  load.py stream URL MODEL
      one streaming chat completion: at least two content chunks, then `data: [DONE]`
  load.py load URL MODEL --workers N --stop FILE --out FILE [--progress FILE]
      chat completions (every other one streamed) from N threads until FILE exists; keeps the
      number of successes in --progress; writes a JSON summary to --out and exits 1 if more
      requests failed than --max-failures (default 0) or none succeeded
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT = 120


def chat(url: str, model: str, stream: bool, content: str = "Say hello.") -> str:
    """One chat completion; returns the answer's text, raises on anything wrong."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": stream,
    }
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        if not stream:
            answer = json.loads(resp.read())
            text = answer["choices"][0]["message"]["content"]
            if not text.strip():
                raise RuntimeError(f"empty answer: {answer}")
            return text
        chunks: list[str] = []
        done = False
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            delta = json.loads(data)["choices"][0].get("delta", {})
            if delta.get("content"):
                chunks.append(delta["content"])
        if not done:
            raise RuntimeError(f"stream ended without [DONE] after {len(chunks)} chunks")
        if len(chunks) < 2:
            raise RuntimeError(f"expected an incremental stream, got {len(chunks)} chunk(s)")
        return "".join(chunks)


def stream_once(url: str, model: str) -> int:
    text = chat(url, model, stream=True)
    print(f"streamed answer: {text.strip()[:80]!r}")
    return 0


def load(url: str, model: str, workers: int, stop: Path, out: Path, progress: Path | None, max_failures: int = 0) -> int:
    lock = threading.Lock()
    ok = 0
    failed: list[str] = []

    def worker(n: int) -> None:
        nonlocal ok
        i = 0
        while not stop.exists():
            i += 1
            try:
                chat(url, model, stream=(i % 2 == 0), content=f"Count to three. ({n}.{i})")
                with lock:
                    ok += 1
                    if progress is not None:
                        progress.write_text(str(ok))
            except (urllib.error.URLError, OSError, RuntimeError, KeyError, ValueError) as e:
                detail = e.read().decode(errors="replace")[:300] if isinstance(e, urllib.error.HTTPError) else ""
                with lock:
                    failed.append(f"{time.strftime('%H:%M:%S')} worker {n}: {e!r} {detail}")

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(workers)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = {"ok": ok, "failed": len(failed), "seconds": round(time.monotonic() - started, 1), "errors": failed[:20]}
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if ok > 0 and len(failed) <= max_failures else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stream")
    s.add_argument("url")
    s.add_argument("model")
    lo = sub.add_parser("load")
    lo.add_argument("url")
    lo.add_argument("model")
    lo.add_argument("--workers", type=int, default=2)
    lo.add_argument("--stop", type=Path, required=True)
    lo.add_argument("--out", type=Path, required=True)
    lo.add_argument("--progress", type=Path)
    lo.add_argument("--max-failures", type=int, default=0)
    args = parser.parse_args()
    if args.command == "stream":
        return stream_once(args.url, args.model)
    return load(args.url, args.model, args.workers, args.stop, args.out, args.progress, args.max_failures)


if __name__ == "__main__":
    sys.exit(main())
