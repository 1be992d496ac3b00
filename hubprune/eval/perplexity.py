"""Perplexity on held-out token windows: what ``hubprune eval`` reports beside the tasks.

The held-out text is the default corpus's ``heldout`` split (``hubprune.calibration``), which
calibration and healing never read.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hubprune.calibration import default_corpus, token_windows
from hubprune.eval.scoring import process_share


@torch.no_grad()
def perplexity(
    model, ids: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity"
) -> float:
    """exp(mean next-token NLL) of ``model`` over token windows ``ids`` ([n, seq_len]).

    Example: ``perplexity(model, token_windows(tok, default_corpus("wiki", "heldout"), 16, 256).ids)``
    """
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
    return default_corpus(corpus, "heldout")


def heldout_windows(
    tokenizer,
    corpus: str = HELDOUT["corpus"],
    n_samples: int = HELDOUT["n_samples"],
    seq_len: int = HELDOUT["seq_len"],
):
    """Token windows of the default corpus's held-out split (never used for calibration or healing)."""
    return token_windows(tokenizer, heldout_texts(corpus), n_samples, seq_len, f"{corpus} corpus (heldout split)")
