"""How much one task loses when given layers are removed, without healing.

    .venv/bin/python bench/sensitivity.py 13-18 --singles 6-28 --task hellaswag --sample 300

Each positional argument is a set of 0-based layers to remove together ("13-18" is 13..18,
"9,12,19" three layers); ``--singles A-B`` adds every layer from A to B alone. For each set
the model is cut in memory (``hubprune.architecture.surgery.drop_layers``), scored on ``--sample`` evenly
spaced questions of ``--task`` (acc_norm, harness-style), and printed beside the original:
its accuracy, the change, and the standard error of that change over the same questions
(paired). This is an analysis of where a task's accuracy lives, not a way to choose layers:
it reads the evaluation questions.
"""

from __future__ import annotations

import argparse

import torch

from hubprune import LayerPruner
from hubprune.architecture.surgery import drop_layers
from hubprune.eval.scoring import loglikelihoods, mean_stderr, question_scores
from hubprune.eval.tasks import load_task


def parse_layers(text: str) -> list[int]:
    """'13-18' -> [13, ..., 18]; '9,12,19' -> [9, 12, 19] (0-based, inclusive ranges)."""
    layers: list[int] = []
    for part in text.split(","):
        start, _, end = part.partition("-")
        layers.extend(range(int(start), int(end or start) + 1))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="*", help="layer sets to remove together, e.g. 13-18 or 9,12,19")
    parser.add_argument("--singles", help="also every layer of this range alone, e.g. 6-28")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--sample", type=int, default=300, help="evenly spaced questions of the task")
    args = parser.parse_args()
    sets = [parse_layers(s) for s in args.sets]
    if args.singles:
        sets += [[layer] for layer in parse_layers(args.singles)]
    if not sets:
        parser.error("give at least one layer set or --singles")

    torch.set_grad_enabled(False)
    pruner = LayerPruner.from_pretrained(args.model)
    docs = load_task(args.task, sample=args.sample)
    requests = [request for doc in docs for request in doc.requests]

    def correct(model) -> list[float]:
        lls = loglikelihoods(model, pruner.tokenizer, requests, 16, progress=False, desc=args.task)
        return question_scores(docs, lls)[1]  # acc_norm, one 0/1 per question

    base = correct(pruner.model)
    n = len(base)
    print(f"{args.model}, {args.task} acc_norm on {n} evenly spaced questions; original {sum(base) / n:.3f}")
    print("| removed (0-based) | acc_norm | change | paired stderr |\n|---|---|---|---|")
    for removed in sets:
        scores = correct(drop_layers(pruner.model, removed))
        diffs = [s - b for s, b in zip(scores, base)]
        print(f"| {','.join(map(str, removed))} | {sum(scores) / n:.3f} | {sum(diffs) / n:+.3f} | "
              f"{mean_stderr(diffs):.3f} |", flush=True)


if __name__ == "__main__":
    main()
