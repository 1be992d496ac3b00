"""Scores of one model, as hubprune records them: a TaskScore per task and an EvalResult that holds them.

An ``EvalResult`` is what ``hubprune eval`` prints (``table``), writes (``--out``, ``hubprune.json``)
and the model card reads, whichever backend scored the tasks (``hubprune.eval.evaluate``,
``hubprune.eval.harness``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class TaskScore:
    """Accuracy of one task with its standard errors (None where n < 2) and chance level."""

    name: str
    acc: float
    acc_norm: float
    acc_stderr: float | None
    acc_norm_stderr: float | None
    n: int
    chance: float


@dataclass
class EvalResult:
    """Scores of one model: task accuracies and, once merged in, a held-out perplexity.

    Example: ``evaluate_tasks(model, tok, ["piqa"], limit=100).merge(EvalResult(perplexity=16.2)).table()``
    """

    tasks: dict[str, TaskScore] = field(default_factory=dict)
    perplexity: float | None = None
    heldout: str | None = None  # what the perplexity was measured on

    def to_dict(self) -> dict:
        return {
            "tasks": {name: asdict(score) for name, score in self.tasks.items()},
            "perplexity": self.perplexity,
            "heldout": self.heldout,
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        known = {f.name for f in fields(TaskScore)}
        tasks = {}
        for name, score in data.get("tasks", {}).items():
            if set(score) != known:
                raise ValueError(f"task {name!r} has fields {sorted(score)}; a TaskScore has {sorted(known)}")
            tasks[name] = TaskScore(**score)
        return cls(tasks, data.get("perplexity"), data.get("heldout"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def merge(self, other: EvalResult) -> EvalResult:
        """A new result with the tasks of both (``other`` wins a clash) and whichever perplexity is set."""
        if other.perplexity is not None:
            return EvalResult({**self.tasks, **other.tasks}, other.perplexity, other.heldout)
        return EvalResult({**self.tasks, **other.tasks}, self.perplexity, self.heldout)

    def above_chance(self, tasks: Iterable[str]) -> float:
        """Mean of acc_norm minus chance over ``tasks``: what layer removal is judged on."""
        names = list(tasks)
        missing = [t for t in names if t not in self.tasks]
        if missing or not names:
            raise ValueError(f"no scores for {missing or 'any task'}; this result has {sorted(self.tasks)}")
        return sum(self.tasks[t].acc_norm - self.tasks[t].chance for t in names) / len(names)

    def retention(self, original: EvalResult, tasks: Iterable[str]) -> float:
        """The share of ``original``'s accuracy above chance that this model keeps, over ``tasks``.

        Example: ``pruned.retention(original, ["arc_easy", "piqa", "hellaswag"])`` -> 0.93
        """
        names = list(tasks)
        return self.above_chance(names) / original.above_chance(names)

    def table(self, other: EvalResult | None = None, names: tuple[str, str] = ("original", "pruned")) -> str:
        """The scores as an aligned text table, one task per row; with ``other`` (this result is then
        the original), both side by side with the share of accuracy above chance that ``other`` keeps."""
        if other is None:
            rows: list[tuple[str, ...]] = [("task", "n", "acc", "acc_norm", "chance")]
            for s in self.tasks.values():
                rows.append(
                    (s.name, str(s.n), _pm(s.acc, s.acc_stderr), _pm(s.acc_norm, s.acc_norm_stderr), f"{s.chance:.4f}")
                )
            if self.perplexity is not None:
                rows.append(("held-out perplexity", "", f"{self.perplexity:.3f}", "", ""))
            return _aligned(rows)
        rows = [("acc_norm", "n", *names, "kept above chance")]
        for name, s in self.tasks.items():
            o = other.tasks.get(name)
            if o is None:
                continue
            kept = (o.acc_norm - o.chance) / (s.acc_norm - s.chance) if s.acc_norm > s.chance else math.nan
            rows.append(
                (name, str(s.n), _pm(s.acc_norm, s.acc_norm_stderr), _pm(o.acc_norm, o.acc_norm_stderr), f"{kept:.1%}")
            )
        shared = [name for name in self.tasks if name in other.tasks]
        if len(shared) > 1 and self.above_chance(shared) > 0:
            rows.append(
                (
                    "mean above chance",
                    "",
                    f"{self.above_chance(shared):.4f}",
                    f"{other.above_chance(shared):.4f}",
                    f"{other.retention(self, shared):.1%}",
                )
            )
        if self.perplexity is not None and other.perplexity is not None:
            rows.append(
                (
                    "held-out perplexity",
                    "",
                    f"{self.perplexity:.3f}",
                    f"{other.perplexity:.3f}",
                    f"x{other.perplexity / self.perplexity:.3f}",
                )
            )
        return _aligned(rows)


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pm(value: float, stderr: float | None) -> str:
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"
