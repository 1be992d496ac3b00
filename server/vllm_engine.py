"""The vLLM engine: one vLLM OpenAI server process per model, and a streaming proxy to it.

vLLM lives in its own virtual environment, so the process is started with that venv's
Python, on a free port of 127.0.0.1, with a fresh API key passed through the environment
(never on the command line). The router forwards requests with httpx and relays the SSE
bytes as they come; vLLM's own errors pass through with their status.

Example::

    engine = VLLMEngine(ModelSpec(path="out/smollm2-24l"), folder="out/smollm2-24l",
                        python=".venv-vllm/bin/python", on_gpu=False, cpu_kv_gib=1)
    await engine.start()      # returns when the process answers /health
    await engine.close()      # SIGTERM to its process group, SIGKILL after a grace period
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import anyio
import httpx
from starlette.responses import Response, StreamingResponse

from hubprune.server.config import ModelSpec
from hubprune.server.engine import Engine
from hubprune.server.metrics import RequestStats
from hubprune.server.process import die_with_parent, free_port
from hubprune.server.protocol import ROUTES, APIError, Sampling, sse

logger = logging.getLogger(__name__)
# hubprune's names for bitsandbytes-style loading -> vLLM's quantization methods.
_QUANTIZATION = {"4bit": "bitsandbytes", "8bit": "fp8"}


class EngineStartError(RuntimeError):
    """An engine did not come up; the message carries the end of its log."""


@functools.lru_cache(maxsize=8)
def vllm_available(python: str | Path, timeout: float = 120.0) -> bool:
    """Whether ``python`` exists and can ``import vllm``. Example: ``vllm_available(".venv-vllm/bin/python")``."""
    if not Path(python).is_file():
        return False
    try:
        return subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class VLLMEngine(Engine):
    """A model served by its own vLLM process (or by a vLLM server already running at ``spec.url``)."""

    kind = "vllm"

    def __init__(
        self,
        spec: ModelSpec,
        *,
        folder: str | None = None,
        python: str | Path | None = None,
        on_gpu: bool = False,
        gpu_memory_utilization: float | None = None,
        cpu_kv_gib: int = 1,
        log_dir: str | Path | None = None,
        startup_timeout: float = 600.0,
    ):
        super().__init__(spec.name, spec.max_model_len)
        self.spec, self.folder, self.python = spec, folder, python
        self.on_gpu, self.gpu_memory_utilization, self.cpu_kv_gib = on_gpu, gpu_memory_utilization, cpu_kv_gib
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="hubprune-serve-"))
        self.log_path = self.log_dir / f"{spec.name.replace('/', '--')}.log"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.client: httpx.AsyncClient | None = None
        self.url = spec.url.rstrip("/") if spec.url else None

    @property
    def _http(self) -> httpx.AsyncClient:
        """The client of the running server (set by ``start``)."""
        if self.client is None:
            raise RuntimeError(f"{self.name}: the engine has not been started")
        return self.client

    def command(self, port: int) -> list[str]:
        """The vLLM server command line for this model on ``port``."""
        s = self.spec
        dtype = "float32" if s.dtype == "auto" and not self.on_gpu else s.dtype  # bf16 is slow on CPUs without AMX
        cmd = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.folder),
            "--served-model-name",
            s.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            dtype,
            "--max-num-seqs",
            str(s.max_num_seqs),
            "--tensor-parallel-size",
            str(s.tensor_parallel_size),
            "--disable-uvicorn-access-log",
        ]
        if s.max_model_len:
            cmd += ["--max-model-len", str(s.max_model_len)]
        if s.quantization:
            cmd += ["--quantization", _QUANTIZATION.get(s.quantization, s.quantization)]
        if self.on_gpu and self.gpu_memory_utilization:
            cmd += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:.3f}"]
        if not self.on_gpu and "--no-enforce-eager" not in s.vllm_args:
            cmd += ["--enforce-eager"]  # compiled float32 graphs gain little on CPU and take minutes to build
        if s.trust_remote_code:
            cmd += ["--trust-remote-code"]
        return cmd + list(s.vllm_args)

    async def start(self) -> None:
        key = None
        if self.url is None:
            port, key = free_port(), secrets.token_urlsafe(24)
            self.url = f"http://127.0.0.1:{port}"
            env = {**os.environ, "VLLM_API_KEY": key}
            if not self.on_gpu:
                env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kv_gib))
            self.log_dir.mkdir(parents=True, exist_ok=True)
            cmd = self.command(port)
            logger.info("%s: starting vLLM on port %d (log: %s)", self.name, port, self.log_path)
            logger.debug("%s: %s", self.name, " ".join(cmd))
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                    preexec_fn=die_with_parent(),
                )
        elif self.spec.url_api_key_env:
            key = os.environ.get(self.spec.url_api_key_env)
            if not key:
                raise EngineStartError(
                    f"{self.name}: url_api_key_env names ${self.spec.url_api_key_env}, which is not set"
                )
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(60.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
        )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        started = time.monotonic()
        while True:
            if self.process is not None and self.process.poll() is not None:
                code = self.process.returncode
                await self.close()
                raise EngineStartError(
                    f"vLLM for {self.name} exited with code {code} while starting. "
                    f"Last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if (await self._http.get("/health", timeout=5.0)).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - started > self.startup_timeout:
                await self.close()
                raise EngineStartError(
                    f"vLLM for {self.name} did not answer {self.url}/health within "
                    f"{self.startup_timeout:.0f} s (raise startup_timeout if it is still loading). "
                    f"Last lines of {self.log_path}:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.5)
        models = (await self._http.get("/v1/models")).json().get("data", [])
        served = next((m for m in models if m.get("id") == self.name), None)
        if served is None:
            raise EngineStartError(
                f"the server at {self.url} does not serve a model named {self.name}; it serves "
                f"{[m.get('id') for m in models]}"
            )
        self.max_model_len = served.get("max_model_len", self.max_model_len)
        logger.info(
            "%s: vLLM ready at %s after %.0f s (context %s)",
            self.name,
            self.url,
            time.monotonic() - started,
            self.max_model_len,
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def handle(self, route: str, body: dict, sampling: Sampling, stats: RequestStats) -> Response:
        if sampling.stream and not sampling.include_usage:  # ask for usage to count tokens; dropped on the way back
            body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        request = self._http.build_request(
            "POST", ROUTES[route], content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            upstream = await self._http.send(request, stream=sampling.stream)
        except httpx.TransportError as err:
            raise APIError(
                503,
                f"the vLLM server of {self.name} did not answer ({type(err).__name__}); its log is {self.log_path}",
                code="engine_unavailable",
            ) from None
        if not sampling.stream or upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            if upstream.status_code == 200:
                u = json.loads(content).get("usage") or {}
                stats.finish(u.get("prompt_tokens"), u.get("completion_tokens"))
            else:
                stats.finish(status=upstream.status_code)
            return Response(
                content,
                status_code=upstream.status_code,
                media_type=upstream.headers.get("content-type", "application/json"),
            )
        return StreamingResponse(self._relay(upstream, stats, sampling.include_usage), media_type="text/event-stream")

    async def _relay(self, upstream: httpx.Response, stats: RequestStats, keep_usage: bool):
        """Pass SSE bytes through as whole events; read (and drop unless asked for) the usage chunk."""
        buffer = b""
        try:
            async for data in upstream.aiter_raw():
                stats.first_token()
                buffer += data
                end = buffer.rfind(b"\n\n")
                if end < 0:
                    continue
                events, buffer = buffer[: end + 2], buffer[end + 2 :]
                if b'"usage"' in events:
                    events = _take_usage(events, stats, keep_usage)
                if b"data: [DONE]" in events:  # counted before the client sees the end, not after upstream closes
                    stats.finish(status=200)
                if events:
                    yield events
            if buffer:
                yield buffer
            stats.finish(status=200)
        except httpx.TransportError as err:  # the vLLM process died or closed the stream mid-answer
            logger.warning("%s: the vLLM stream broke: %s: %s", self.name, type(err).__name__, err)
            stats.finish(status=503)
            yield sse(
                APIError(
                    503,
                    f"the vLLM server of {self.name} stopped mid-answer ({type(err).__name__}); "
                    f"its log is {self.log_path}",
                    code="engine_unavailable",
                ).body()
            )
            yield sse("[DONE]")
        finally:
            with anyio.CancelScope(shield=True):  # the client may have left: close the upstream stream anyway
                await upstream.aclose()
            stats.finish(status=499)  # no-op when the stream ended normally

    async def count_tokens(self, text: str) -> int:
        response = await self._http.post("/tokenize", json={"model": self.name, "prompt": text})
        response.raise_for_status()
        return response.json()["count"]

    async def metrics_text(self) -> str | None:
        if self.client is None:
            return None
        try:
            response = await self._http.get("/metrics", timeout=5.0)
        except httpx.TransportError:
            return None
        return response.text if response.status_code == 200 else None

    async def health(self) -> bool:
        if self.client is None or (self.process is not None and self.process.poll() is not None):
            return False
        try:
            return (await self._http.get("/health", timeout=5.0)).status_code == 200
        except httpx.TransportError:
            return False

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.process is not None:
            await asyncio.to_thread(stop_process_group, self.process)

    def describe(self) -> dict:
        return {**super().describe(), "external": self.process is None}


def stop_process_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the process's group, SIGKILL to what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the server exited; its workers may not have yet
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)


def _take_usage(events: bytes, stats: RequestStats, keep: bool) -> bytes:
    out = []
    for event in events.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"usage"' in event:
            obj = json.loads(event[6:])
            if obj.get("usage") and not obj.get("choices"):
                stats.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                stats.completion_tokens = obj["usage"].get("completion_tokens", 0)
                if not keep:
                    continue
        if event:
            out.append(event + b"\n\n")
    return b"".join(out)
