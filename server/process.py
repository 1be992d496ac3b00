"""``hubprune serve`` as a child process: started, waited for, stopped (for scripts, benchmarks and tests).

Example::

    with ServeProcess(["out/smollm2-24l", "--engine", "transformers"]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


class ServeProcess:
    """Runs ``python -m hubprune.cli serve ARGS --port PORT``; ``start`` returns once /health answers 200."""

    def __init__(
        self, args: list[str], *, port: int | None = None, env: dict | None = None, log_path: str | Path | None = None
    ):
        self.args, self.port = list(args), port or free_port()
        self.env = {**os.environ, **(env or {})}
        self.log_path = (
            Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="hubprune-serve-", suffix=".log")[1])
        )
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> ServeProcess:
        cmd = [sys.executable, "-m", "hubprune.cli", "serve", *self.args, "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                preexec_fn=die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"hubprune serve exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"hubprune serve did not answer {self.url}/health within {timeout:.0f} s; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a clean shutdown that stops every engine), SIGKILL after ``timeout``; the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    """A ``preexec_fn`` under which a child gets SIGTERM when its parent dies, even by SIGKILL (Linux).

    None off the main thread: the kernel sends the signal when the starting *thread* ends."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    return _set_parent_death_signal


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
