"""``hubprune compare``: the comparison app on this machine, in one command.

With a server URL (or ``$HUBPRUNE_SERVER_URL``), the app streams from it. Otherwise, when this
hubprune has ``hubprune serve``, that is started as a child process on a free loopback port (and
stopped on exit); else, or with ``use_server=False``, the models are loaded in this process::

    run_compare(["HuggingFaceTB/SmolLM2-135M-Instruct", "out/smollm2-24l"], open_browser=False)
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from hubprune.server.process import die_with_parent, free_port
from hubprune.space.app import build_app
from hubprune.space.backends import make_backends, model_specs, parse_model

logger = logging.getLogger(__name__)


def run_compare(
    models: list[str],
    *,
    server_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    open_browser: bool = True,
    votes_path: str | None = None,
    device: str = "auto",
    use_server: bool = True,
    engine: str | None = None,
    server_timeout: float = 600.0,
) -> None:
    """Serve the app for ``models`` until interrupted (Ctrl-C or SIGTERM); prints its URL once it answers."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    if threading.current_thread() is threading.main_thread():  # SIGTERM too must stop the server we start
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: anyone who can reach this machine can use the models", host)
    model_specs(models)  # before anything starts
    server_url = server_url or os.environ.get("HUBPRUNE_SERVER_URL") or None
    server = None
    if not server_url and use_server and serve_available():
        server = LocalServer(models, device=device, engine=engine, timeout=server_timeout)
        server_url = server.url
    try:
        backends = make_backends(models, server_url, device=device)
        demo = build_app(backends, votes_path=votes_path)
        demo.queue().launch(
            server_name=host, server_port=port, inbrowser=open_browser, prevent_thread_lock=True, quiet=True
        )
        source = f"server {server_url}" if server_url else "models loaded in this process"
        print(f"hubprune compare: {' vs '.join(b.name for b in backends)} ({source}) at {demo.local_url}", flush=True)
        try:
            demo.block_thread()
        finally:
            demo.close()
    finally:
        if server is not None:
            server.stop()


def serve_available() -> bool:
    """Whether this hubprune has a ``hubprune serve`` command to start."""
    import hubprune.cli

    return hasattr(hubprune.cli, "cmd_serve") and importlib.util.find_spec("hubprune.server.launch") is not None


class LocalServer:
    """``hubprune serve MODELS`` as a child process on a free 127.0.0.1 port; ``stop()`` ends it."""

    def __init__(self, models: list[str], *, device: str = "auto", engine: str | None = None, timeout: float = 600.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.names = [parse_model(m)[0] for m in models]
        command = [
            sys.executable,
            "-m",
            "hubprune.cli",
            "serve",
            *models,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            device,
            *(["--engine", engine] if engine else []),
            "--shutdown-grace",
            "1",
        ]  # its only client is this app, which is going away
        logger.info("starting %s", " ".join(command))
        # its own session: a Ctrl-C reaches only this app, which closes its streams first and then stops the
        # server; die_with_parent: a SIGKILLed app leaves no server behind
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self.ready = False
        threading.Thread(target=self._relay, daemon=True).start()
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _relay(self) -> None:
        if self.process.stdout is None:  # started with stdout=PIPE
            return
        for line in self.process.stdout:
            self.tail.append(line.rstrip())
            logger.log(logging.DEBUG if self.ready else logging.INFO, "serve: %s", line.rstrip())

    def _wait(self, timeout: float) -> None:
        import httpx

        key = os.environ.get("HUBPRUNE_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the relay thread read the last lines
                raise RuntimeError(
                    f"hubprune serve exited with status {self.process.returncode}:\n" + "\n".join(self.tail)
                )
            try:
                listed = httpx.get(f"{self.url}/models", headers=headers, timeout=2).json().get("data", [])
                if set(self.names) <= {m.get("id") for m in listed}:
                    logger.info("hubprune serve is ready at %s", self.url)
                    self.ready = True
                    return
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"hubprune serve did not list {self.names} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
