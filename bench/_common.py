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

from hubprune.methods.sparsity import target_modules


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


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def nonzero(model) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def size(model) -> dict:
    """A row's size columns: parameters stored, nonzero parameters, and the weights' memory in MB."""
    return {
        "parameters": count(model),
        "nonzero": nonzero(model),
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6,
    }


def width_for(model, cut: int, layers_kept: int) -> float:
    """The MLP width (share of neurons kept) that removes ``cut`` parameters from ``model`` with
    ``layers_kept`` layers: each neuron is a row of gate and up and a column of down."""
    mlp = model.model.layers[0].mlp
    size = mlp.up_proj.out_features
    per_neuron = sum(p.in_features for p in (mlp.gate_proj, mlp.up_proj)) + mlp.down_proj.out_features
    return (size - cut / (layers_kept * per_neuron)) / size


def cut_plans(pruner, n: int) -> dict[str, dict]:
    """Each row's prune() arguments, at the parameter cut of removing n layers."""
    # Parameter counts do not depend on which layers go: the first n stand in (no scan needed).
    total = count(pruner.model)
    cut = total - count(pruner.prune(layers=list(range(n))).model)
    half = n // 2
    after_half = count(pruner.prune(layers=list(range(half))).model)
    linear = sum(m.weight.numel() for m in target_modules(pruner.model).values())
    return {
        "depth": {"n_layers": n},
        "width": {"mlp_width": width_for(pruner.model, cut, pruner.num_layers)},
        "depth+width": {
            "n_layers": half,
            "mlp_width": width_for(pruner.model, after_half - (total - cut), pruner.num_layers - half),
        },
        "wanda-equal": {"sparsity": round(cut / linear, 4)},
        "wanda-50": {"sparsity": 0.5},
        "wanda-2:4": {"sparsity": "2:4"},
    }


# Methods healed as the recipe heals; the others are public layer choices, unhealed.
HEALED = ("hubprune", "last", "width", "depth+width", "wanda", "wanda-50", "wanda-2:4")
# The equal-cut methods: the prune() arguments of bench/width.py's rows at the cut of n layers.
# "wanda-50" and "wanda-2:4" zero a fixed share whatever n is (40 % of the parameters, past any n here).
CUT_ROWS = {
    "width": "width",
    "depth+width": "depth+width",
    "wanda": "wanda-equal",
    "wanda-50": "wanda-50",
    "wanda-2:4": "wanda-2:4",
}


def compared_model(method: str, pruner, recipe, n: int):
    """One row's model: the original, a public layer choice unhealed ("angular", "block_influence"),
    the last n layers healed as the recipe heals ("last"), the recipe itself ("hubprune"), or,
    healed as the recipe heals, a cut of as many parameters as n layers made another way
    ("width": every MLP narrowed; "depth+width": n // 2 layers of the recipe's choice and the
    MLPs narrowed for the rest; "wanda": as many weights zeroed by Wanda, stored dense; "wanda-50",
    "wanda-2:4": half of them, unstructured or two of every four, whatever n is).
    Returns (model, removed layers, healing seconds or None, the healing report or {})."""
    if method == "original":
        return pruner.model, [], None, {}
    layers = pruner.num_layers
    if method == "last":
        pruned = pruner.prune(layers=list(range(layers - n, layers)))
    elif method in CUT_ROWS:
        kwargs = cut_plans(pruner, n)[CUT_ROWS[method]]
        if "n_layers" in kwargs:
            kwargs = {**kwargs, "metric": recipe.prune.metric}
        pruned = pruner.prune(**kwargs)  # narrowed or sparsified on the scan's calibration text
    else:
        metric = {"angular": "angular_last", "block_influence": "block_influence"}.get(method, recipe.prune.metric)
        pruned = pruner.prune(n_layers=n, metric=metric)
    seconds = None
    if method in HEALED and recipe.heal is not None:
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
