"""Zero-shot multiple choice scored the way lm-evaluation-harness (0.4.13, HFLM) scores it.

Each (context, continuation) pair is tokenized as HFLM's ``_encode_pair`` does, with the
tokenizer's default special tokens (a BOS token only where the tokenizer adds one, as HFLM
does with ``add_bos_token=None``), and its log-likelihood is summed over the continuation
tokens (log-softmax in float32). ``acc`` is the argmax of that sum; ``acc_norm`` divides it
by the length of the choice text *in characters* (``len(choice)`` in
``ConfigurableTask.process_results``; the harness's byte-length variant is ``acc_bytes``).
Standard errors are ``mean_stderr``. Options that share a context share one forward pass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hubprune.eval.results import TaskScore
from hubprune.eval.tasks import Doc

_DEFAULT_MAX_LENGTH = 2048  # HFLM's fallback when neither config nor tokenizer names a context length


_TOKENIZER_INFINITY = 1000000000000000019884624838656


def scored_logits(model, scored: torch.Tensor, **inputs) -> torch.Tensor:
    """float32 logits [N, V] of ``model`` at the N positions where ``scored`` ([B, T] bool) is True,
    for the model inputs ``inputs`` (``input_ids``, and ``attention_mask``/``position_ids`` if padded).

    The hidden states are gathered before the output projection (a hook on it), so the
    projection, the softmax and their backward run on the scored positions only; gathering the
    logits after would scatter the backward into a [B, T, V] gradient.

    Example: ``scored_logits(model, labels != -100, input_ids=ids)``
    """
    head = getattr(model, "module", model).get_output_embeddings()  # "module": under DDP

    def gather(_module, args):
        return (args[0][scored], *args[1:])

    hook = head.register_forward_pre_hook(gather)
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        hook.remove()
    return (logits[scored] if logits.dim() == 3 else logits).float()  # [B, T, V]: a model that bypassed its head


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """HFLM's ``_encode_pair``: trailing spaces of the context move to the continuation; the
    continuation's tokens are those of context+continuation after the context's own.

    Example: ``encode_pair(tok, "Question: 2+2?\\nAnswer: ", "4")`` scores " 4" after "...Answer:".
    """
    if not context:  # HFLM.loglikelihood: an empty context becomes the prefix (BOS or EOS) token
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = _tok_encode(tokenizer, context + continuation), _tok_encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def _tok_encode(tokenizer, text: str) -> list[int]:
    # HFLM.tok_encode with add_bos_token=None: the tokenizer's default special tokens, except
    # for text that already starts with the BOS string.
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


def max_length(model, tokenizer) -> int:
    """The context length HFLM truncates to: config n_positions / max_position_embeddings / n_ctx,
    else the tokenizer's model_max_length, else 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != _TOKENIZER_INFINITY else _DEFAULT_MAX_LENGTH


@dataclass
class _Row:
    """One model input: a context, then (when shared) each option's continuation as its own branch."""

    tokens: list[int]
    positions: list[int]
    branch: list[int]  # -1 for the shared context, k for tokens of the k-th continuation
    reads: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (request, logit indices, targets)


def _plan(encoded: list[tuple[list[int], list[int]]], limit: int, share_up_to: int) -> list[_Row]:
    """Model inputs for the encoded requests: HFLM's (context + continuation)[:-1], left-truncated,
    one per distinct input; requests with the same context share one packed row where allowed."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(encoded):
        by_context.setdefault(tuple(context), []).append(i)
    rows: list[_Row] = []
    plain: dict[tuple[int, ...], _Row] = {}
    for ctx, members in by_context.items():
        conts = [encoded[i][1] for i in members]
        packed = len(ctx) + sum(len(c) - 1 for c in conts)
        if len(members) > 1 and packed <= share_up_to and all(len(ctx) + len(c) <= limit + 1 for c in conts):
            row = _Row(list(ctx), list(range(len(ctx))), [-1] * len(ctx))
            for k, (i, cont) in enumerate(zip(members, conts)):
                start = len(row.tokens)
                row.tokens += cont[:-1]
                row.positions += range(len(ctx), len(ctx) + len(cont) - 1)
                row.branch += [k] * (len(cont) - 1)
                row.reads.append((i, [len(ctx) - 1, *range(start, start + len(cont) - 1)], cont))
            rows.append(row)
            continue
        for i, cont in zip(members, conts):
            tokens = (list(ctx) + cont)[-(limit + 1) :][:-1]
            if tuple(tokens) not in plain:
                plain[tuple(tokens)] = _Row(tokens, list(range(len(tokens))), [-1] * len(tokens))
                rows.append(plain[tuple(tokens)])
            plain[tuple(tokens)].reads.append((i, list(range(len(tokens) - len(cont), len(tokens))), cont))
    return sorted(rows, key=lambda row: (-len(row.tokens), row.tokens))  # longest first, as HFLM


def _share_limit(model) -> int:
    """Longest packed row the model scores exactly: packing needs an additive 4D mask (eager or
    sdpa attention) and must stay inside a sliding window, where the model has one."""
    if getattr(model.config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return 0
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "sliding_window", None) or 1 << 62


@torch.no_grad()
def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[float]:
    """Summed log-probability of each continuation given its context, scored in batches.

    Inputs are left-truncated to the model's max length, sorted longest first and padded on
    the right. Options that share a context share one forward: the context once, then each
    continuation as a branch that sees the context and itself only (a block mask with
    restarted positions), so the scores equal those of separate forwards.

    Example: ``loglikelihoods(model, tok, [("Question: Sky colour?\\nAnswer:", " blue")])`` (one float per request)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    limit = max_length(model, tokenizer)
    encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    for i, (_, cont) in enumerate(encoded):
        if not cont or len(cont) > limit:
            raise ValueError(
                f"request {i} has {len(cont)} continuation tokens; 1 to {limit} (the model's max length) "
                f"can be scored: {requests[i]!r:.200}"
            )
    rank, world = process_share()
    rows = _plan(encoded, limit, _share_limit(model))[rank::world]  # under accelerate launch: this process's share
    device = next(model.parameters()).device
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    results = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with tqdm(
            total=sum(len(row.reads) for row in rows), desc=desc, unit="req", disable=not progress, leave=False
        ) as bar:
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                width = len(batch[0].tokens)
                ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], right-padded
                for b, row in enumerate(batch):
                    ids[b, : len(row.tokens)] = torch.tensor(row.tokens)
                kwargs = {"input_ids": ids.to(device), "use_cache": False}
                if any(max(row.branch) >= 0 for row in batch):
                    kwargs.update(_branch_mask(batch, width, model.dtype, device))
                first = min(indices[0] for row in batch for _, indices, _ in row.reads)
                if keep_arg:  # the output head runs only from the first scored position on
                    kwargs["logits_to_keep"] = width - first
                logits = model(**kwargs).logits  # [B, T', V]
                offset = width - logits.shape[1]
                for b, row in enumerate(batch):
                    for i, indices, targets in row.reads:
                        picked = logits[b, [j - offset for j in indices]].float()  # [len(targets), V]
                        logprobs = F.log_softmax(picked, dim=-1)
                        results[i] = float(logprobs.gather(1, torch.tensor(targets, device=device)[:, None]).sum())
                    bar.update(len(row.reads))
    finally:
        model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        mine = [(i, results[i]) for row in rows for i, _, _ in row.reads]
        for i, score in gather_object(mine):
            results[i] = score
    return results


def process_share() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless running under ``accelerate launch`` or torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _branch_mask(batch: list[_Row], width: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Additive [B, 1, T, T] mask: causal, and a branch token sees the context and its own branch."""
    branch = torch.full((len(batch), width), -1, dtype=torch.long)  # padding counts as context: no empty rows
    positions = torch.zeros(len(batch), width, dtype=torch.long)
    for b, row in enumerate(batch):
        branch[b, : len(row.tokens)] = torch.tensor(row.branch)
        positions[b, : len(row.tokens)] = torch.tensor(row.positions)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & ((branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None]))  # [B, T, T]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"attention_mask": mask[:, None].to(device), "position_ids": positions.to(device)}


# ---------------------------------------------------------------- metrics, as lm-eval computes them


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of equal maxima, as np.argmax


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n); None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: Sequence[float | None], sizes: Sequence[int]) -> float | None:
    """lm-eval's ``pooled_sample_stderr``: a size-weighted group's stderr from its subtasks'."""
    known = [s for s in stderrs if s is not None]
    if len(known) < len(stderrs) or sum(sizes) <= len(sizes):
        return None
    variance = sum((n - 1) * s**2 * n for s, n in zip(known, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(variance / sum(sizes))


def question_scores(docs: Sequence[Doc], lls: Sequence[float]) -> tuple[list[float], list[float]]:
    """Per question, in order: 1.0 where ``acc`` counts it right, then the same for ``acc_norm``.

    Example: ``question_scores(docs, loglikelihoods(model, tok, [r for d in docs for r in d.requests]))``
    """
    correct, correct_norm = [], []
    cursor = 0
    for doc in docs:
        scores = lls[cursor : cursor + len(doc.requests)]
        cursor += len(doc.requests)
        correct.append(float(_argmax(scores) == doc.gold))
        normed = [ll / len(choice) if choice else -math.inf for ll, choice in zip(scores, doc.choices)]
        correct_norm.append(float(_argmax(normed) == doc.gold))
    if cursor != len(lls):
        raise ValueError(f"{len(lls)} log-likelihoods for {cursor} requests")
    return correct, correct_norm


def score_docs(name: str, docs: Sequence[Doc], lls: Sequence[float]) -> TaskScore:
    """acc and acc_norm of a task from the log-likelihoods of its requests, in order.

    Groups (MMLU subjects) are averaged weighted by size, i.e. over all questions, and their
    standard error is the pooled one, as the harness's ``mmlu`` group reports.
    """
    try:
        answers, answers_norm = question_scores(docs, lls)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    correct: dict[str, list[float]] = {}
    correct_norm: dict[str, list[float]] = {}
    for doc, right, right_norm in zip(docs, answers, answers_norm):
        correct.setdefault(doc.group, []).append(right)
        correct_norm.setdefault(doc.group, []).append(right_norm)
    sizes = [len(v) for v in correct.values()]

    def summary(groups: dict[str, list[float]]) -> tuple[float, float | None]:
        flat = [v for values in groups.values() for v in values]
        if len(groups) == 1:
            return sum(flat) / len(flat), mean_stderr(flat)
        return sum(flat) / len(flat), pooled_stderr([mean_stderr(v) for v in groups.values()], sizes)

    acc, acc_stderr = summary(correct)
    acc_norm, acc_norm_stderr = summary(correct_norm)
    chance = sum(1 / len(doc.choices) for doc in docs) / len(docs)
    return TaskScore(name, acc, acc_norm, acc_stderr, acc_norm_stderr, len(docs), chance)
