"""Quality against the fraction of layers dropped (Gromov et al.'s Fig. 1), and the largest drop
that stays within a quality budget, both from measurements.

Quality is measured on zero-shot tasks (mean acc_norm above chance, relative to the
original's), as held-out perplexity (the original's divided by the pruned model's), or on
chat answers (top-1 agreement with the original's greedy answers to held-out prompts,
``hubprune.eval.chat``; 32 prompts of up to 64 tokens), so that 1.0 means "as good as the
original" each way.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hubprune.config import METRICS, HealConfig
from hubprune.eval.chat import chat_fidelity, reference_answers
from hubprune.eval.evaluate import evaluate_tasks
from hubprune.eval.perplexity import heldout_windows, perplexity

logger = logging.getLogger(__name__)

QUALITIES = ("perplexity", "tasks", "chat")
CHAT_PROMPTS, CHAT_TOKENS = 32, 64  # chat quality in sweeps: fewer, shorter answers than `hubprune eval --chat`


@dataclass
class SweepPoint:
    """One measured model: which layers were dropped, by which metric, healed or not, and its quality."""

    metric: str
    n_layers: int
    fraction: float
    removed_layers: list[int]
    healed: bool
    quality: float  # 1.0 = the original's
    perplexity: float | None = None
    tasks: dict = field(default_factory=dict)


@dataclass
class SweepResult:
    """Every point of a sweep, with the original's scores. Saves as JSON and CSV, plots as PNG."""

    model: str
    num_layers: int
    quality: str
    original: dict
    points: list[SweepPoint] = field(default_factory=list)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write ``sweep.json``, ``sweep.csv`` and ``sweep.png`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sweep.json").write_text(json.dumps(asdict(self), indent=1))
        with (folder / "sweep.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["metric", "healed", "n_layers", "fraction", "quality", "perplexity", "removed_layers"])
            for p in self.points:
                writer.writerow(
                    [
                        p.metric,
                        p.healed,
                        p.n_layers,
                        f"{p.fraction:.4f}",
                        f"{p.quality:.4f}",
                        "" if p.perplexity is None else f"{p.perplexity:.4f}",
                        " ".join(map(str, p.removed_layers)),
                    ]
                )
        self.plot(folder / "sweep.png")
        return {name: folder / name for name in ("sweep.json", "sweep.csv", "sweep.png")}

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for metric in dict.fromkeys(p.metric for p in self.points):
            for healed in (False, True):
                pts = sorted((p.fraction, p.quality) for p in self.points if p.metric == metric and p.healed == healed)
                if pts:
                    ax.plot(*zip(*pts), "o--" if healed else "o-", label=f"{metric}{' + heal' if healed else ''}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("fraction of layers dropped")
        ax.set_ylabel(
            "quality relative to the original "
            + {"tasks": "(above chance)", "perplexity": "(perplexity)", "chat": "(chat top-1 agreement)"}[self.quality]
        )
        ax.set_title(f"{self.model}: {self.num_layers} layers", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


class QualityMeter:
    """Measures a model's quality relative to the original, on tasks or on held-out perplexity."""

    def __init__(
        self,
        pruner,
        quality: str = "perplexity",
        tasks=("arc_easy", "piqa", "hellaswag"),
        limit: int | None = 200,
        progress: bool = True,
    ):
        check_quality(quality)
        self.pruner, self.quality, self.tasks, self.limit, self.progress = (
            pruner,
            quality,
            list(tasks),
            limit,
            progress,
        )
        self.windows = heldout_windows(pruner.tokenizer, n_samples=16)
        self.reference = None
        if quality == "chat":
            self.reference = reference_answers(
                pruner.model, pruner.tokenizer, n_prompts=CHAT_PROMPTS, max_new_tokens=CHAT_TOKENS, progress=progress
            )
        self.original = self.measure_raw(pruner.model)

    def measure_raw(self, model) -> dict:
        result: dict[str, Any] = {"perplexity": perplexity(model, self.windows.ids)}
        if self.quality == "tasks":
            scores = evaluate_tasks(model, self.pruner.tokenizer, self.tasks, limit=self.limit, progress=False)
            result["tasks"] = {k: asdict(v) for k, v in scores.tasks.items()}
        if self.quality == "chat":
            fidelity = chat_fidelity(
                model, self.pruner.model, self.pruner.tokenizer, reference=self.reference, free=False, progress=False
            )
            result["chat"] = {"top1_agreement": fidelity.top1_agreement, "kl": fidelity.kl}
        return result

    def relative(self, raw: dict) -> float:
        if self.quality == "perplexity":
            return self.original["perplexity"] / raw["perplexity"]
        if self.quality == "chat":
            return raw["chat"]["top1_agreement"]
        above = [raw["tasks"][t]["acc_norm"] - raw["tasks"][t]["chance"] for t in self.tasks]
        base = [self.original["tasks"][t]["acc_norm"] - self.original["tasks"][t]["chance"] for t in self.tasks]
        return sum(above) / sum(base)

    def point(self, pruned, metric: str, healed: bool) -> SweepPoint:
        raw = self.measure_raw(pruned.model)
        r = pruned.record
        return SweepPoint(
            metric,
            len(r.removed_layers),
            len(r.removed_layers) / r.base_num_layers,
            r.removed_layers,
            healed,
            self.relative(raw),
            raw["perplexity"],
            raw.get("tasks", {}),
        )


def sweep(
    pruner,
    fractions=(0.1, 0.2, 0.3, 0.4, 0.5),
    metrics=("angular_last", "block_influence"),
    *,
    quality: str = "perplexity",
    tasks=("arc_easy", "piqa", "hellaswag"),
    limit: int | None = 200,
    heal: HealConfig | None = None,
    progress: bool = True,
) -> SweepResult:
    """Measure quality for each fraction and metric, before (and, with ``heal``, after) healing.

    Example: ``sweep(pruner, fractions=(0.1, 0.2, 0.3)).save("out/sweep")``
    """
    check_sweep(fractions, metrics, quality)
    if pruner.scan_result is None:
        pruner.scan(progress=progress)
    meter = QualityMeter(pruner, quality, tasks, limit, progress)
    result = SweepResult(pruner.origin.base_model, pruner.num_layers, quality, meter.original)
    sizes = sorted({max(1, min(pruner.num_layers - 1, round(f * pruner.num_layers))) for f in fractions})
    jobs = [(metric, n) for metric in metrics for n in sizes]
    for metric, n in tqdm(jobs, desc="sweep", unit="model", disable=not progress):
        pruned = pruner.prune(n_layers=n, metric=metric, progress=False)
        result.points.append(meter.point(pruned, metric, healed=False))
        if heal is not None:
            result.points.append(meter.point(pruned.heal(heal, progress=False), metric, healed=True))
    return result


def check_quality(quality: str) -> None:
    """ValueError unless ``quality`` is one of QUALITIES."""
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {', '.join(QUALITIES)}, got {quality!r}")


def check_sweep(fractions, metrics, quality: str = "perplexity") -> None:
    """Refuse sweep options that cannot be measured, before any model is loaded (ValueError).

    Example: ``check_sweep((0.1, 0.2), ("angular_last",))``
    """
    choices = [m for m in METRICS if m != "perplexity"]  # one extra pass per candidate block, per size
    for metric in metrics:
        if metric not in choices:
            raise ValueError(f"sweep metric {metric!r} is not one of {', '.join(choices)}")
    for fraction in fractions:
        if not 0 < fraction < 1:
            raise ValueError(f"a sweep fraction is the share of layers dropped, in (0, 1), got {fraction}")
    check_quality(quality)


def largest_drop_within(
    pruner,
    max_loss: float,
    metric: str = "angular_last",
    *,
    quality: str = "perplexity",
    tasks=("arc_easy", "piqa", "hellaswag"),
    limit: int | None = 200,
    progress: bool = True,
) -> tuple[int, list[SweepPoint]]:
    """The most layers whose removal keeps quality >= (1 - max_loss) x the original's, by binary search
    over measured models (quality falls as more layers go). Returns (n, the points measured).

    Example: ``n, points = largest_drop_within(pruner, 0.05)``  # within 5 % of the original
    """
    if not 0 < max_loss < 1:
        raise ValueError(f"max_loss is a fraction of the original's quality in (0, 1), got {max_loss}")
    if pruner.scan_result is None:
        pruner.scan(progress=progress)
    meter = QualityMeter(pruner, quality, tasks, limit, progress)
    low, high, points = 0, pruner.num_layers - 1, []  # low: known to pass (0 layers); high: largest candidate
    while low < high:
        n = (low + high + 1) // 2
        point = meter.point(pruner.prune(n_layers=n, metric=metric, progress=False), metric, healed=False)
        points.append(point)
        logger.info("dropping %d layers keeps %.1f%% of the original's quality", n, 100 * point.quality)
        if point.quality >= 1 - max_loss:
            low = n
        else:
            high = n - 1
    if low == 0:
        raise ValueError(
            f"even one layer costs more than {max_loss:.0%} of the quality ({quality}); "
            "allow a larger loss or heal after pruning"
        )
    return low, points
