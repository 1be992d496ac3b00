"""Score every block of layers from one forward pass over calibration tokens.

For a model with L layers, let h_l be the residual stream entering layer l (h_L: the
output of the last layer, *before* the final norm). One pass with hooks gives, per token,
the cosine of every pair (h_i, h_j), accumulated on the fly batch by batch:

- angular distance d(l, l+n) = arccos(cos(h_l, h_{l+n})) / pi (Gromov et al. 2024), for
  every block size n = 1..L-1 and start l, on the last token of each window
  (``angular_last``, the paper's choice) and averaged over all tokens (``angular_all``);
- Block Influence BI_l = 1 - cos(h_l, h_{l+1}) over all tokens (ShortGPT).

The loss-based criterion (``perplexity``: calibration perplexity with block [l, l+n)
removed, as in SLEB / Shortened LLaMA) costs one extra pass per candidate and is optional.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hubprune._version import __version__
from hubprune.architecture.families import decoder_layers, final_hidden_hook
from hubprune.architecture.surgery import drop_layers
from hubprune.calibration import TokenWindows
from hubprune.eval.perplexity import perplexity

logger = logging.getLogger(__name__)

METRIC_TITLES = {
    "angular_last": "angular distance, last token",
    "angular_all": "angular distance, all tokens",
    "block_influence": "block influence (ShortGPT)",
    "perplexity": "calibration perplexity with the block removed",
}


@dataclass
class ScanResult:
    """Scores of every block of layers. Layers are 0-based; a block [l, l+n) is half-open.

    ``angular_last[n - 1][l]`` is d(l, l+n) for n = 1..L-1 and l = 0..L-n (same shape for
    ``angular_all``); ``block_influence[l]`` is layer l's BI; ``perplexity[n][l]`` is the
    calibration perplexity with [l, l+n) removed, for the block sizes that were measured.

    Example: ``ScanResult.load("scan.json").choose(6, "angular_last")``
    """

    model: str
    num_layers: int
    angular_last: list[list[float]]
    angular_all: list[list[float]]
    block_influence: list[float]
    perplexity: dict[int, list[float]] = field(default_factory=dict)
    baseline_perplexity: float | None = None
    calibration: dict = field(default_factory=dict)
    seconds: float | None = None
    hubprune_version: str = ""

    def scores(self, metric: str, n: int) -> list[float]:
        """The score of every start l for blocks of n layers (BI: of every single layer)."""
        if not 1 <= n < self.num_layers:
            raise ValueError(
                f"block size {n} is out of range: this model has {self.num_layers} layers; "
                f"use 1 to {self.num_layers - 1}"
            )
        if metric == "block_influence":
            return list(self.block_influence)
        if metric == "perplexity":
            if n not in self.perplexity:
                raise ValueError(f"no perplexity scan for blocks of {n} layers; run scan(..., loss_block_sizes=[{n}])")
            return list(self.perplexity[n])
        if metric in ("angular_last", "angular_all"):
            return list(getattr(self, metric)[n - 1])
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_TITLES)}")

    def choose(self, n: int, metric: str = "angular_last") -> list[int]:
        """The n layers (0-based, ascending) this scan would drop under ``metric``.

        Angular and perplexity metrics pick the contiguous block with the lowest score;
        block influence picks the n individual layers with the lowest BI (ShortGPT).
        """
        scores = self.scores(metric, n)
        if metric == "block_influence":
            return sorted(sorted(range(self.num_layers), key=scores.__getitem__)[:n])
        start = min(range(len(scores)), key=scores.__getitem__)
        return list(range(start, start + n))

    def table(self, block_sizes: list[int] | None = None) -> str:
        """A text table: for each block size, the layers each metric would drop, and the score."""
        sizes = block_sizes or list(range(1, self.num_layers))
        metrics = ["angular_last", "angular_all", *(["perplexity"] if self.perplexity else [])]
        head = ["n", *[f"{m}: drop" for m in metrics], *[f"{m}: score" for m in metrics], "block_influence: drop"]
        rows = []
        for n in sizes:
            picks, scores = [], []
            for metric in metrics:
                if metric == "perplexity" and n not in self.perplexity:
                    picks.append("-")
                    scores.append("-")
                    continue
                layers = self.choose(n, metric)
                picks.append(describe_layers(layers))
                scores.append(f"{self.scores(metric, n)[layers[0]]:.4g}")
            rows.append([str(n), *picks, *scores, describe_layers(self.choose(n, "block_influence"))])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        tokens = self.calibration.get("tokens", "?")
        return f"{self.model}: {self.num_layers} layers, {tokens} calibration tokens\n{self.table()}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["perplexity"] = {str(n): v for n, v in self.perplexity.items()}
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ScanResult:
        try:
            data = json.loads(Path(path).read_text())
            data["perplexity"] = {int(n): v for n, v in data.get("perplexity", {}).items()}
            return cls(**data)
        except FileNotFoundError:
            raise
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path} is not a hubprune scan result: {err}") from None

    def plot(self, path: str | Path, metric: str = "angular_last") -> Path:
        """Write a PNG heat map of the metric over (start layer l, block size n)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        L = self.num_layers
        grid = np.full((L - 1, L), np.nan)
        for n in range(1, L):
            if metric == "perplexity" and n not in self.perplexity:
                continue
            values = self.scores(metric, n) if metric != "block_influence" else None
            if values is not None:
                grid[n - 1, : len(values)] = values
        if metric == "block_influence":
            grid = np.array([self.block_influence])
        fig, ax = plt.subplots(figsize=(max(6, L * 0.28), max(4, (grid.shape[0]) * 0.22 + 1.5)))
        image = ax.imshow(
            grid, origin="lower", aspect="auto", cmap="viridis", extent=(-0.5, L - 0.5, 0.5, grid.shape[0] + 0.5)
        )
        if metric != "block_influence":
            for n in range(1, L):
                row = grid[n - 1]
                if not np.all(np.isnan(row)):
                    ax.plot(np.nanargmin(row), n, "o", color="red", markersize=3)
            ax.set_ylabel("block size n (layers dropped)")
        ax.set_xlabel("first dropped layer l (0-based)")
        ax.set_title(f"{self.model}: {METRIC_TITLES[metric]}\n(red: the block hubprune would drop)", fontsize=9)
        fig.colorbar(image, ax=ax, label=metric)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def describe_layers(layers: list[int]) -> str:
    """``[12, 13, 14]`` -> ``"[12, 15)"``; non-contiguous lists are written out."""
    if layers == list(range(layers[0], layers[0] + len(layers))):
        return f"[{layers[0]}, {layers[0] + len(layers)})"
    return "{" + ",".join(map(str, layers)) + "}"


class PairStats:
    """Running sums over tokens of arccos(cos)/pi for every pair of residual states, and cos of neighbours."""

    def __init__(self, num_layers: int):
        n = num_layers + 1
        self.angle_all = torch.zeros(n, n, dtype=torch.float64)
        self.angle_last = torch.zeros(n, n, dtype=torch.float64)
        self.cos_next = torch.zeros(num_layers, dtype=torch.float64)
        self.tokens = 0
        self.windows = 0

    def add(self, x: torch.Tensor, ends_window: bool) -> None:
        """``x``: [tokens, L+1, D] states of consecutive tokens; its last row ends a window if ``ends_window``."""
        x = F.normalize(x.float(), dim=-1)
        cos = torch.bmm(x, x.transpose(1, 2)).clamp_(-1.0, 1.0)  # [tokens, L+1, L+1]
        angle = torch.arccos(cos).div_(math.pi)
        self.angle_all += angle.sum(0).double().cpu()
        self.cos_next += torch.diagonal(cos, offset=1, dim1=1, dim2=2).sum(0).double().cpu()
        self.tokens += x.size(0)
        if ends_window:
            self.angle_last += angle[-1].double().cpu()
            self.windows += 1

    def result(self, name: str, windows: TokenWindows, seconds: float) -> ScanResult:
        L = self.cos_next.numel()
        mean_all, mean_last = self.angle_all / self.tokens, self.angle_last / self.windows
        return ScanResult(
            model=name,
            num_layers=L,
            angular_last=[[mean_last[i, i + n].item() for i in range(L - n + 1)] for n in range(1, L)],
            angular_all=[[mean_all[i, i + n].item() for i in range(L - n + 1)] for n in range(1, L)],
            block_influence=(1 - self.cos_next / self.tokens).tolist(),
            calibration={
                "source": windows.source,
                "windows": len(windows.ids),
                "seq_len": windows.ids.size(1),
                "tokens": windows.num_tokens,
                "fingerprint": windows.fingerprint(),
            },
            seconds=round(seconds, 3),
            hubprune_version=__version__,
        )


@torch.no_grad()
def scan_model(
    model, windows: TokenWindows, *, batch_size: int = 4, progress: bool = True, name: str = ""
) -> ScanResult:
    """Angular distances for every block and block influence per layer, from one pass.

    Example: ``scan_model(model, calibration_windows(tokenizer)).choose(4)``
    """
    layers = decoder_layers(model)
    L = len(layers)
    device = next(model.parameters()).device
    states: list[torch.Tensor | None] = [None] * (L + 1)

    def capture(index: int):
        def hook(module, args, kwargs):
            states[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(final_hidden_hook(model, lambda hidden: states.__setitem__(L, hidden)))
    stats = PairStats(L)
    started = time.perf_counter()
    try:
        bar = tqdm(total=windows.num_tokens, desc="scan", unit="tok", unit_scale=True, disable=not progress)
        for start in range(0, len(windows.ids), batch_size):
            batch = windows.ids[start : start + batch_size].to(device)
            model.base_model(input_ids=batch, use_cache=False)  # the decoder stack only, no lm_head
            captured = cast(list[torch.Tensor], states)  # every hook has fired
            for b in range(batch.size(0)):
                stats.add(torch.stack([s[b] for s in captured], dim=1), ends_window=True)  # [T, L+1, D]
            states[:] = [None] * (L + 1)
            bar.update(batch.numel())
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
    return stats.result(name, windows, time.perf_counter() - started)


@torch.no_grad()
def loss_scan(model, windows: TokenWindows, n: int, *, batch_size: int = 4, progress: bool = True) -> list[float]:
    """Calibration perplexity with each block [l, l+n) removed, for l = 0..L-n (L-n+1 passes)."""
    L = len(decoder_layers(model))
    if not 1 <= n < L:
        raise ValueError(f"block size {n} is out of range: this model has {L} layers; use 1 to {L - 1}")
    scores = []
    for start in tqdm(range(L - n + 1), desc=f"perplexity scan, n={n}", unit="block", disable=not progress):
        candidate = drop_layers(model, list(range(start, start + n)))
        scores.append(perplexity(candidate, windows.ids, batch_size))
    return scores
