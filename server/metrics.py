"""Per-model request metrics in Prometheus text format (no client library needed).

Example::

    metrics = Metrics()
    stats = metrics.request("smollm2", "chat")
    stats.first_token(); stats.finish(prompt_tokens=37, completion_tokens=8)
    print(metrics.render())
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


@dataclass
class _Histogram:
    buckets: tuple
    counts: list = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        counts = self.counts or [0] * len(self.buckets)
        out, running = [], 0
        for bound, count in zip(self.buckets, counts):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.n}')
        out.append(f"{name}_sum{{{labels}}} {self.total:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.n}")
        return out


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
    """Counters and histograms per model; ``render()`` gives the Prometheus exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)  # (model, endpoint, status) -> count
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.generation_tokens: dict[str, int] = defaultdict(int)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.ttft: dict[str, _Histogram] = defaultdict(lambda: _Histogram(TTFT_BUCKETS))
        self.duration: dict[str, _Histogram] = defaultdict(lambda: _Histogram(DURATION_BUCKETS))
        self.decode_tps: dict[str, _Histogram] = defaultdict(lambda: _Histogram(TPS_BUCKETS))

    def request(self, model: str, endpoint: str) -> RequestStats:
        return RequestStats(self, model, endpoint)

    def record(self, s: RequestStats) -> None:
        now = time.perf_counter()
        with self._lock:
            self.requests[(s.model, s.endpoint, str(s.status))] += 1
            if s.status != 200:
                return
            self.prompt_tokens[s.model] += s.prompt_tokens
            self.generation_tokens[s.model] += s.completion_tokens
            self.duration[s.model].observe(now - s.started)
            if s.first_token_at is not None:
                self.ttft[s.model].observe(s.first_token_at - s.started)
                if s.completion_tokens > 1 and now > s.first_token_at:
                    self.decode_tps[s.model].observe((s.completion_tokens - 1) / (now - s.first_token_at))

    def render(self) -> str:
        with self._lock:
            lines = _block(
                "hubprune_requests_total",
                "counter",
                "Requests answered, by model, endpoint and status.",
                [
                    f'{{model="{_esc(m)}",endpoint="{e}",status="{c}"}} {v}'
                    for (m, e, c), v in sorted(self.requests.items())
                ],
            )
            for name, data, text in (
                ("hubprune_prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                ("hubprune_generation_tokens_total", self.generation_tokens, "Tokens generated."),
            ):
                lines += _block(name, "counter", text, [f'{{model="{_esc(m)}"}} {v}' for m, v in sorted(data.items())])
            lines += _block(
                "hubprune_requests_in_flight",
                "gauge",
                "Requests running or queued.",
                [f'{{model="{_esc(m)}"}} {v}' for m, v in sorted(self.in_flight.items())],
            )
            for name, hists, text in (
                ("hubprune_time_to_first_token_seconds", self.ttft, "Time from request to first generated token."),
                ("hubprune_request_duration_seconds", self.duration, "Time from request to last byte."),
                ("hubprune_decode_tokens_per_second", self.decode_tps, "Tokens/s after the first token, per request."),
            ):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
                for model, hist in sorted(hists.items()):
                    lines += hist.lines(name, f'model="{_esc(model)}"')
        return "\n".join(lines) + "\n"


def _block(name: str, kind: str, text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *(name + s for s in samples)]


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
