"""Per-model request metrics for ``/metrics``, kept in a per-app prometheus_client registry.

The engines' own metrics (each vLLM process's ``vllm:*``: KV-cache use, queue length, ...) are
passed through with a ``model`` label naming the served model.

Example::

    metrics = Metrics()
    stats = metrics.request("smollm2", "chat")
    stats.first_token(); stats.finish(prompt_tokens=37, completion_tokens=8)
    print(metrics.render().decode())
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RequestStats:
    """Timing and token counts of one request; ``finish`` records them once."""

    def __init__(self, metrics: Metrics, model: str, endpoint: str):
        self.metrics, self.model, self.endpoint = metrics, model, endpoint
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.status = 200
        self._done = False

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def finish(
        self, prompt_tokens: int | None = None, completion_tokens: int | None = None, status: int | None = None
    ) -> None:
        if prompt_tokens is not None:
            self.prompt_tokens = prompt_tokens
        if completion_tokens is not None:
            self.completion_tokens = completion_tokens
        if status is not None:
            self.status = status
        if not self._done:
            self._done = True
            self.metrics.record(self)


class Metrics:
    """Counters and histograms per model in their own registry; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "hubprune_requests",
            "Requests answered, by model, endpoint and status.",
            ["model", "endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "hubprune_prompt_tokens", "Prompt tokens processed.", ["model"], registry=registry
        )
        self.generation_tokens = Counter(
            "hubprune_generation_tokens", "Tokens generated.", ["model"], registry=registry
        )
        self.in_flight = Gauge(
            "hubprune_requests_in_flight", "Requests running or queued.", ["model"], registry=registry
        )
        self.ttft = Histogram(
            "hubprune_time_to_first_token_seconds",
            "Time from request to first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "hubprune_request_duration_seconds",
            "Time from request to last byte.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.decode_tps = Histogram(
            "hubprune_decode_tokens_per_second",
            "Tokens/s after the first token, per request.",
            ["model"],
            buckets=TPS_BUCKETS,
            registry=registry,
        )
        self.engines = _EngineMetrics()
        registry.register(self.engines)

    def request(self, model: str, endpoint: str) -> RequestStats:
        return RequestStats(self, model, endpoint)

    def record(self, s: RequestStats) -> None:
        now = time.perf_counter()
        self.requests.labels(s.model, s.endpoint, str(s.status)).inc()
        if s.status != 200:
            return
        self.prompt_tokens.labels(s.model).inc(s.prompt_tokens)
        self.generation_tokens.labels(s.model).inc(s.completion_tokens)
        self.duration.labels(s.model).observe(now - s.started)
        if s.first_token_at is not None:
            self.ttft.labels(s.model).observe(s.first_token_at - s.started)
            if s.completion_tokens > 1 and now > s.first_token_at:
                self.decode_tps.labels(s.model).observe((s.completion_tokens - 1) / (now - s.first_token_at))

    def render(self, engine_texts: dict[str, str] | None = None) -> bytes:
        """The exposition text; ``engine_texts``: each model's engine metrics (Prometheus text) to pass through."""
        self.engines.texts = engine_texts or {}
        return generate_latest(self.registry)


class _EngineMetrics:
    """A collector of the engines' own metrics, merged by family, each sample labelled with its model."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def collect(self):
        families: dict[str, Metric] = {}
        for model, text in self.texts.items():
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError as err:  # one engine's broken text must not break /metrics
                logger.warning("%s: unreadable engine metrics: %s", model, err)
                continue
            for family in parsed:
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "model": model}, sample.value, sample.timestamp)
        return list(families.values())

    def describe(self):
        return []  # registered before any engine has answered: nothing to check names against
