"""The interface every engine behind the router implements.

An engine serves one model: the embedded transformers engine generates in this process,
the vLLM engine forwards to a vLLM server process. The router only calls these methods::

    engine = TransformersEngine(spec, folder="out/smollm2-24l", device="cpu")
    await engine.start()
    response = await engine.handle("chat", body, sampling, stats)   # a starlette Response
    await engine.close()
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from starlette.responses import Response

from hubprune.server.metrics import RequestStats
from hubprune.server.protocol import Sampling


class Engine(ABC):
    """One served model. ``name`` is the request's ``model`` field; ``kind`` names the engine."""

    kind: str = "?"

    def __init__(self, name: str, max_model_len: int | None = None):
        self.name = name
        self.max_model_len = max_model_len

    @abstractmethod
    async def start(self) -> None:
        """Load the model or start its process; return when it answers requests."""

    @abstractmethod
    async def handle(self, route: str, body: dict, sampling: Sampling, stats: RequestStats) -> Response:
        """Answer one checked request (route "chat" or "completions"), streamed or not.

        Errors before the first byte raise ``APIError``; ``stats.finish`` is called once the
        answer is complete (for a stream: when its last chunk was sent).
        """

    @abstractmethod
    async def count_tokens(self, text: str) -> int:
        """The number of tokens ``text`` is as a completions prompt."""

    @abstractmethod
    async def health(self) -> bool:
        """Whether the engine can answer now."""

    @abstractmethod
    async def close(self) -> None:
        """Free the model / stop the process. Safe to call twice."""

    async def metrics_text(self) -> str | None:
        """The engine's own Prometheus metrics (passed through /metrics with a model label), if it has any."""
        return None

    def describe(self) -> dict:
        """Extra facts shown in /v1/models under ``hubprune``."""
        return {"engine": self.kind, "max_model_len": self.max_model_len}
