"""Helpers shared by the benchmarks: a peak-memory sampler, a repeat-and-take-the-median timer, the
models the recipe comparisons measure, and rows saved as they finish and reused by a rerun."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch


class PeakMemory:
    """Peak resident memory (CPU) or peak allocated memory (CUDA) above the level at entry, in MiB."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._process, self._stop = psutil.Process(), threading.Event()
        self._base = self._peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = (self._peak - self._base) / 2**20


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compared_model(method: str, pruner, recipe, n: int):
    """One row's model: the original, a public layer choice unhealed ("angular", "block_influence"),
    the last n layers healed as the recipe heals ("last"), or the recipe itself ("hubprune").
    Returns (model, removed layers, healing seconds or None, the healing report or {})."""
    if method == "original":
        return pruner.model, [], None, {}
    layers = pruner.num_layers
    if method == "last":
        pruned = pruner.prune(layers=list(range(layers - n, layers)))
    else:
        metric = {"angular": "angular_last", "block_influence": "block_influence"}.get(method, recipe.prune.metric)
        pruned = pruner.prune(n_layers=n, metric=metric)
    seconds = None
    if method in ("last", "hubprune") and recipe.heal is not None:
        started = time.perf_counter()
        pruned = pruned.heal(recipe.heal)  # the refit, then LoRA distillation: all of the healing budget
        seconds = time.perf_counter() - started
    return pruned.model, pruned.record.removed_layers, seconds, pruned.record.healing


def saved_row(path: Path, settings: dict, measure: Callable[[], dict], label: str, fresh: bool = False):
    """(row, reused): the row saved at ``path`` when it was measured with the same ``settings``
    (and not ``fresh``), else ``measure()`` plus the settings, written atomically to ``path``."""
    if path.is_file() and not fresh:
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved, True
    print(f"== {label}", flush=True)
    row = {**measure(), "settings": settings}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, path)
    return row, False
