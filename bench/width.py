"""Depth, MLP width and sparsity at one parameter cut: which keeps the most of the model?

    .venv/bin/python bench/width.py [--layers 6] [--sample 200] [--heal-steps 20] [--rows ...]

The cut is that of removing ``--layers`` whole layers (for SmolLM2-135M-Instruct, 6 of 30:
-15.8 % of the parameters). Rows, each unhealed and (with ``--heal-steps``) healed by the
default recipe's healing (refit, then LoRA distillation on the original's own conversations)
cut short to that many steps:

- ``depth``: the angular block of ``--layers`` layers (Gromov et al.), as hubprune prunes it;
- ``width``: every MLP narrowed to the intermediate size that removes as many parameters;
- ``depth+width``: half the layers, and the MLPs narrowed to remove the other half of the cut;
- ``wanda-equal``: unstructured Wanda sparsity zeroing as many weights as the cut removes;
- ``wanda-50``, ``wanda-2:4``: 50 % unstructured and 2:4 Wanda sparsity (more zeros than the cut).

Columns: ARC-Easy, PIQA, HellaSwag acc_norm (--sample N evenly spaced questions of each), the
share of the original's accuracy above chance kept, held-out perplexity against the original's,
batch-1 greedy decode speed against the original's, parameters (dense and nonzero) and the
weights' memory as stored. Sparse weights are stored dense here, so they run at dense speed.
Rows are saved as they finish (one JSON each under --out) and reused by a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from _common import cut_plans, saved_row, size
from frontier import TASKS, decode_speed, load
from hubprune.eval.evaluate import evaluate_model
from hubprune.eval.perplexity import heldout_texts
from hubprune.eval.results import EvalResult

ROWS = ("depth", "width", "depth+width", "wanda-equal", "wanda-50", "wanda-2:4")


def kwargs_needs_scan(row: str) -> bool:
    return row in ("depth", "depth+width")  # the angular block is chosen by the scan


def measure(model, tokenizer, sample: int | None, prompts: list[list[int]]) -> dict:
    result = evaluate_model(model, tokenizer, TASKS, sample=sample)
    return {
        "result": result.to_dict(),
        "decode_tokens_per_second": decode_speed(model, tokenizer, prompts),
        **size(model),
    }


def table(rows: list[dict]) -> str:
    original = next(r for r in rows if r["row"] == "original")
    base = EvalResult.from_dict(original["result"])
    header = ("row", "healed", "what", *TASKS, "kept above chance", "ppl ratio", "decode speed",
              "params", "nonzero", "weights MB")
    lines = [header]
    order = ["original", *ROWS]
    for r in sorted(rows, key=lambda r: (r["healed"], order.index(r["row"]))):
        result = EvalResult.from_dict(r["result"])
        lines.append((r["row"], "yes" if r["healed"] else "no", r["what"],
                      *(f"{result.tasks[t].acc_norm:.3f}" for t in TASKS), f"{result.retention(base, TASKS):.1%}",
                      f"{result.perplexity / base.perplexity:.2f}x",
                      f"{r['decode_tokens_per_second'] / original['decode_tokens_per_second']:.2f}x",
                      f"{r['parameters'] / 1e6:.1f}M", f"{r['nonzero'] / 1e6:.1f}M", f"{r['weights_mb']:.0f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="the parameter cut: that of removing this many layers")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {','.join(ROWS)}")
    parser.add_argument("--sample", type=int, default=200, help="questions per task, evenly spaced (0: all)")
    parser.add_argument("--heal-steps", type=int, default=0, help="also heal each row this many steps (0: no)")
    parser.add_argument("--out", default="out/bench-width")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    pruner, recipe = load("smollm2", None)
    if any(kwargs_needs_scan(r) for r in rows):
        pruner.scan(recipe.calibration)
    else:
        pruner.calibrate(recipe.calibration)  # the same windows the scan would read
    tokenizer = pruner.tokenizer
    prompts = [tokenizer(text[:200]).input_ids for text in heldout_texts()[:4]]
    kwargs = cut_plans(pruner, args.layers)
    heal = None
    if args.heal_steps:  # the recipe's healing cut short, its warm-up shortened with it
        warmup = min(recipe.heal.warmup_steps, args.heal_steps // 5)
        heal = replace(recipe.heal, steps=args.heal_steps, warmup_steps=warmup)
    settings = {"recipe": recipe.to_dict(), "sample": args.sample or None, "tasks": list(TASKS),
                "layers": args.layers, "heal_steps": args.heal_steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def measure_row(row: str, healed: bool) -> dict:
        seconds = None
        if row == "original":
            model, what = pruner.model, "-"
        else:
            pruned = pruner.prune(**kwargs[row])
            what = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kwargs[row].items())
            if healed:
                started = time.perf_counter()
                pruned = pruned.heal(heal)
                seconds = time.perf_counter() - started
            model = pruned.model
        measured = measure(model, tokenizer, args.sample or None, prompts)
        return {"row": row, "healed": healed, "what": what, "heal_seconds": seconds, **measured}

    results = []
    todo = [("original", False)] + [(r, False) for r in rows] + ([(r, True) for r in rows] if heal else [])
    for row, healed in todo:
        row_data, _ = saved_row(
            out / f"{row.replace(':', '-')}{'-healed' if healed else ''}.json",
            {**settings, "heal_steps": args.heal_steps if healed else 0},
            lambda: measure_row(row, healed),
            f"{row}{' healed' if healed else ''}",
        )
        results.append(row_data)
        print(table(results), flush=True)
    print(f"\n{recipe.model}: {pruner.num_layers} layers; cut of {args.layers} layers; "
          f"{args.sample or 'all'} questions per task\n")
    print(table(results))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
