"""hubprune's default recipe against the public ones, on SmolLM2-135M-Instruct with 6 of 30 layers removed.

    .venv/bin/python bench/recipe.py [--recipe recipes/smollm2-24l.yaml] [--sample 1000] [--out out/bench-recipe]

Rows: the original; Gromov et al.'s angular block and ShortGPT's Block-Influence choice, both
unhealed; the last 6 layers dropped and healed with the recipe's own healing; and the recipe
itself (its layer choice and healing). Each is scored on ARC-Easy, PIQA and HellaSwag (acc_norm,
harness-style; --sample N evenly spaced questions of each, 0 for the full splits) and on
held-out prose perplexity. Prints one table: accuracies, the share of the original's accuracy
above chance that each keeps (chance 1/4, 1/2, 1/4), perplexity against the original's, the
healing wall time (the recipe allows 30 minutes), and the standard error of the three-task mean.

Rows are written to --out as they finish (one JSON each) and a rerun reuses them unless
--fresh is given, so an interrupted run resumes; the table says which rows were reused.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from _common import compared_model, saved_row
from hubprune import LayerPruner
from hubprune.config import Recipe
from hubprune.eval.evaluate import evaluate_model
from hubprune.eval.results import EvalResult

TASKS = ("arc_easy", "piqa", "hellaswag")
ROWS = {
    "original": "original (30 layers)",
    "angular": "Gromov angular block, no healing",
    "block_influence": "ShortGPT Block Influence, no healing",
    "last": "last 6 layers + the same healing",
    "hubprune": "hubprune default recipe",
}


def measure(row: str, pruner: LayerPruner, recipe: Recipe, n: int, sample: int | None) -> dict:
    """Prune (and heal) one row's model and score it; returns what the table needs."""
    model, removed, heal_seconds, healing = compared_model(row, pruner, recipe, n)
    result = evaluate_model(model, pruner.tokenizer, TASKS, sample=sample)
    return {"row": row, "removed": removed, "heal_seconds": heal_seconds, "result": result.to_dict(),
            "refit": healing.get("refit", {}), "heal_loss": [healing.get("first_loss"), healing.get("final_loss")]}


def mean_stderr(result: EvalResult) -> float:
    """Standard error of the mean acc_norm over TASKS (independent tasks)."""
    return math.sqrt(sum(result.tasks[t].acc_norm_stderr ** 2 for t in TASKS)) / len(TASKS)


def table(rows: dict[str, dict], reused: set[str]) -> str:
    original = EvalResult.from_dict(rows["original"]["result"])
    header = ("model", "removed", *TASKS, "mean", "kept above chance", "ppl", "ppl ratio", "heal time")
    lines = [header]
    for name, label in ROWS.items():
        if name not in rows:
            continue
        data = rows[name]
        result = EvalResult.from_dict(data["result"])
        removed = data["removed"]
        span = f"{removed[0]}-{removed[-1]}" if removed and removed == list(range(removed[0], removed[-1] + 1)) \
            else ",".join(map(str, removed)) or "-"
        heal = f"{data['heal_seconds'] / 60:.1f} min" if data["heal_seconds"] else "-"
        lines.append((label + (" (reused)" if name in reused else ""), span,
                      *(f"{result.tasks[t].acc_norm:.4f}" for t in TASKS),
                      f"{sum(result.tasks[t].acc_norm for t in TASKS) / len(TASKS):.4f}",
                      f"{result.retention(original, TASKS):.1%}", f"{result.perplexity:.2f}",
                      f"{result.perplexity / original.perplexity:.2f}x", heal))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sizes = ", ".join(f"{t} {original.tasks[t].n}" for t in TASKS)
    ses = ", ".join(f"{ROWS[n].split(',')[0]} {mean_stderr(EvalResult.from_dict(d['result'])):.4f}"
                    for n, d in rows.items())
    return "\n".join(text) + f"\n\nquestions: {sizes}; standard error of the three-task mean: {ses}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(Path(__file__).parent.parent / "recipes" / "smollm2-24l.yaml"))
    parser.add_argument("--sample", type=int, default=1000, help="questions per task, evenly spaced (0: full splits)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"which rows to measure, of {','.join(ROWS)}")
    parser.add_argument("--out", default="out/bench-recipe", help="one JSON per row; reused by a rerun")
    parser.add_argument("--fresh", action="store_true", help="measure every row again")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.rows.split(",")
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    recipe = Recipe.load(args.recipe)
    if recipe.heal is None:
        parser.error(f"{args.recipe} has no heal section: the comparison needs the recipe's healing")
    sample = args.sample or None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"recipe": Path(args.recipe).read_text(), "sample": sample, "tasks": list(TASKS)}

    pruner = LayerPruner.from_pretrained(recipe.model, dtype=recipe.dtype)
    pruner.scan(recipe.calibration)
    n = recipe.prune.count(pruner.num_layers)
    rows, reused = {}, set()
    for row in ["original", *[r for r in wanted if r != "original"]]:
        rows[row], was_saved = saved_row(
            out / f"{row}.json", settings, lambda: measure(row, pruner, recipe, n, sample), ROWS[row], args.fresh
        )
        if was_saved:
            reused.add(row)
    print(f"\n{recipe.model}, {n} of {pruner.num_layers} layers removed; recipe {args.recipe}\n")
    print(table(rows, reused))
    refit = rows.get("hubprune", {}).get("refit", {})
    for gap in refit.get("gaps", []):
        print(f"hubprune refit: layer {gap['refit_layer']} {gap['module']} for the removed {gap['removed']}, "
              f"fit error {gap['relative_error_before']:.3f} -> {gap['relative_error_after']:.3f} "
              f"({refit['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
