"""Quality measurements of a model: perplexity on held-out token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) of ``model`` over token windows ``ids`` ([n, seq_len]).

    Example: ``perplexity(model, token_windows(tok, default_corpus("wiki", "heldout"), 16, 256).ids)``
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
