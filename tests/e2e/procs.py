"""Child processes for the end-to-end tests: readiness from a line on stdout (bounded wait, no
sleeps), stderr captured to a file that failures show, teardown by the PID started here
(SIGTERM, then SIGKILL after a bound)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path


class ProcessError(AssertionError):
    """A child process did not become ready (or died). The message carries its stderr tail."""


class Proc:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self.stdout_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - lives as long as the child
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=env,
                cwd=cwd,
                text=True,
                bufsize=1,
            )
        except OSError as e:
            self._stderr.close()
            raise ProcessError(f"{name}: cannot start {self.argv[0]}: {e}") from e
        self.pid = self.popen.pid
        # Keep draining stdout for the whole life of the child, so it never blocks on a full pipe.
        self._reader = threading.Thread(
            target=self._read_stdout, name=f"{name}-stdout", daemon=True
        )
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            self.stdout_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)  # EOF

    def stderr_tail(self, max_lines: int = 60) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no stderr file)"
        tail = "\n".join(lines[-max_lines:])
        return tail or "(stderr empty)"

    def describe_failure(self, what: str) -> str:
        rc = self.popen.poll()
        state = f"exited with code {rc}" if rc is not None else "still running"
        stdout = "\n".join(self.stdout_lines[-20:]) or "(nothing)"
        return (
            f"{self.name}: {what}\n"
            f"  command: {' '.join(self.argv)}\n"
            f"  process {self.pid} {state}\n"
            f"  stdout:\n{_indent(stdout)}\n"
            f"  stderr ({self.stderr_path}), last lines:\n{_indent(self.stderr_tail())}"
        )

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Block until a stdout line matches `pattern` (re.search), the child exits, or timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProcessError(
                    self.describe_failure(
                        f"no stdout line matching {pattern!r} within {timeout:.0f}s"
                    )
                )
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait(timeout=5)
                raise ProcessError(
                    self.describe_failure(f"exited before printing a line matching {pattern!r}")
                )
            m = rx.search(line)
            if m:
                return m

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Only this PID is signalled."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=grace)
        self._reader.join(timeout=2)
        self._stderr.close()
        return self.popen.returncode


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def base_env() -> dict[str, str]:
    """The children's environment: no proxies (all traffic is loopback), quiet colours."""
    env = dict(os.environ)
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(k, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    env.setdefault("RUST_BACKTRACE", "1")
    env["NO_COLOR"] = "1"
    return env
