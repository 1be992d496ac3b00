"""Quality measurements of a model: perplexity on held-out token windows."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model, ids: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity"
) -> float:
    """exp(mean next-token NLL) of ``model`` over token windows ``ids`` ([n, seq_len]).

    Example: ``perplexity(model, token_windows(tok, default_corpus("wiki", "heldout"), 16, 256).ids)``
    """
    from hubprune.tasks import process_share

    device = next(model.parameters()).device
    rank, world = process_share()
    ids = ids[rank::world]  # under accelerate launch each process takes its share of the windows
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(total_nll, total_tokens)])
        total_nll, total_tokens = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return math.exp(total_nll / total_tokens)


HELDOUT: dict[str, Any] = {"corpus": "wiki", "n_samples": 32, "seq_len": 256}


def heldout_texts(corpus: str = HELDOUT["corpus"]) -> list[str]:
    """The documents of the default corpus's held-out split: what ``hubprune eval`` measures
    perplexity on, so healing text must never overlap them (``heal(..., eval_texts=...)``)."""
    from hubprune.calibration import default_corpus

    return default_corpus(corpus, "heldout")


def heldout_windows(
    tokenizer,
    corpus: str = HELDOUT["corpus"],
    n_samples: int = HELDOUT["n_samples"],
    seq_len: int = HELDOUT["seq_len"],
):
    """Token windows of the default corpus's held-out split (never used for calibration or healing)."""
    from hubprune.calibration import token_windows

    return token_windows(tokenizer, heldout_texts(corpus), n_samples, seq_len, f"{corpus} corpus (heldout split)")


def evaluate_model(
    model,
    tokenizer,
    tasks=("arc_easy", "piqa", "hellaswag"),
    *,
    limit: int | None = None,
    sample: int | None = None,
    heldout: dict | None = None,
    batch_size: int = 16,
    progress: bool = True,
    backend: str = "hubprune",
    data: dict | None = None,
):
    """Held-out perplexity plus zero-shot tasks, as one ``hubprune.tasks.EvalResult``.

    ``backend="lm-eval"`` scores the tasks with lm-evaluation-harness itself (any harness task;
    ``data`` maps a task to a local copy of its data, see ``hubprune.harness``); the default
    scores hubprune's built-in tasks the way the harness does.

    Example: ``evaluate_model(model, tokenizer, ["piqa"], limit=200).table()``
    """
    from hubprune.tasks import evaluate_tasks

    heldout = {**HELDOUT, **(heldout or {})}
    if backend == "lm-eval":
        from hubprune.harness import evaluate_harness

        result = evaluate_harness(
            model,
            tokenizer,
            list(tasks),
            data=data,
            limit=limit,
            sample=sample,
            batch_size=batch_size,
            progress=progress,
        )
    elif backend == "hubprune":
        if data:
            raise ValueError("local task data (--data) is for the lm-eval backend; the built-in tasks bring their own")
        result = evaluate_tasks(
            model, tokenizer, tasks, limit=limit, sample=sample, batch_size=batch_size, progress=progress
        )
    else:
        raise ValueError(f"unknown evaluation backend {backend!r}; choose hubprune or lm-eval")
    windows = heldout_windows(tokenizer, **heldout)
    result.perplexity = perplexity(model, windows.ids, progress=progress)
    result.heldout = f"{windows.ids.shape[0]} x {windows.ids.shape[1]} tokens of the {windows.source}"
    return result
