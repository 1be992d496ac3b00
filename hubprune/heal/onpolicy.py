"""On-policy steps of chat healing: the pruned model answers a few of the healing questions itself,
as it stands at that step, and learns the original's distribution along its own answers.

Agarwal et al. 2024 (GKD) and Gu et al. 2024 (MiniLLM): a student distilled only on the teacher's
text never sees the states its own mistakes lead to (a loop it has started, a topic it drifted
to), so it does not learn to leave them. ``HealConfig.on_policy`` is the share of steps that read
such answers instead of the cached conversations (GKD's lambda); the loss stays
``hubprune.heal.lora.healing_loss`` on the answer tokens.

- ``on_policy_step``: whether a step is one (spread evenly, a function of the step: resumable).
- ``on_policy_questions``: the healing questions that leave room for an answer, tokenised once.
- ``on_policy_batch``: the pruned model samples answers to the step's questions; right-padded ids
  and the mask of the answer tokens.
"""

from __future__ import annotations

import math

import torch

from hubprune.config import HealConfig
from hubprune.generation import generate, generating, render
from hubprune.heal.data import permuted


def on_policy_step(step: int, share: float) -> bool:
    """True for the steps, ``share`` of them spread evenly, whose answers the pruned model writes."""
    return math.floor((step + 1) * share) > math.floor(step * share)


def on_policy_count(step: int, share: float) -> int:
    """How many on-policy steps come before ``step``."""
    return math.floor(step * share)


def on_policy_questions(tokenizer, prompts: list[str], seq_len: int) -> list[list[int]]:
    """The questions an on-policy step can ask: ``prompts`` through the chat template, those that fill
    at most half of a ``seq_len`` window (the rest is for the answer). Done once, before the steps."""
    questions = [ids for ids in render(tokenizer, prompts, chat=True) if len(ids) <= seq_len // 2]
    if not questions:
        raise ValueError(
            f"none of the {len(prompts)} chat healing questions fits in half of heal.seq_len "
            f"({seq_len} tokens); raise heal.seq_len or set heal.on_policy: 0"
        )
    return questions


@torch.no_grad()
def on_policy_batch(
    model, tokenizer, questions: list[list[int]], index: int, config: HealConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, learn) of on-policy batch ``index``: ``config.batch_size`` of ``questions``
    (``on_policy_questions``, in a seeded order per pass) answered by ``model`` now, sampled as the
    original's answers were (``config.chat``'s temperature and top_p), up to
    ``config.on_policy_tokens``. Right-padded to the longest row; ``learn`` marks the answer tokens
    (the end token included when one came), so padding after an answer is never scored and never
    seen by it."""
    size = config.batch_size
    inputs = [
        questions[permuted(p, len(questions), config.seed + 7919)] for p in range(index * size, (index + 1) * size)
    ]
    room = config.seq_len - max(map(len, inputs))
    with generating(model):
        answers = generate(
            model,
            tokenizer,
            inputs,
            max_new_tokens=min(config.on_policy_tokens, room),
            temperature=config.chat.temperature,
            top_p=config.chat.top_p,
            batch_size=size,
            seed=config.seed + 104729 * (index + 1),
        )
    rows = [p + a.tokens for p, a in zip(inputs, answers)]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((size, width), pad, dtype=torch.long)
    learn = torch.zeros((size, width), dtype=torch.bool)
    for r, (p, a) in enumerate(zip(inputs, answers)):
        ids[r, : len(p) + len(a.tokens)] = torch.tensor(p + a.tokens)
        learn[r, len(p) : len(p) + len(a.tokens)] = True
    return ids, learn
