"""Entry point of the tier's model server image: tests/e2e/model_server's llama.cpp server
(same model and parameters) listening on all addresses of the pod's own network namespace, so
the model Service reaches it. (On the host the model server only ever binds loopback; a pod's
addresses are on this machine's Docker bridge.)

Usage: serve.py [PORT]   (default 11434). Prints "model server ready" once /health is ok;
SIGTERM stops it.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import xllamacpp as xlc

from tests.e2e import model_server as ms


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 11434
    params = ms.build_params(ms.ensure_model(), "0.0.0.0", port)
    server = xlc.Server(params)
    ms.wait_healthy(f"http://127.0.0.1:{port}", time.monotonic() + 300)
    print("model server ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
