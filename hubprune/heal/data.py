"""What healing reads: prose windows, or conversations the original writes itself, and in which order.

- ``healing_text``: chat or prose (``HealConfig.text``), and why.
- ``healing_windows``: the token windows for the whole run: prose from the calibration sources'
  train split (``hubprune.calibration``), or chat conversations (optionally mixed with prose).
- ``self_chat``: the original writes the questions itself, Magpie-style (it is given only its
  template's user-turn prefix and samples the question), then samples the answers through the
  template. The set is cached under ``cache_dir()/chat-data``, keyed by the model's weights and
  the settings, so a rerun reuses it. Questions that match a held-out evaluation prompt
  (``hubprune.eval.chat.eval_prompts``) are dropped; given prompts that do are refused.
- ``chat_windows``: those conversations as token windows with a mask on the answer tokens, the
  only tokens healing learns.
- ``micro_batch``: which windows a training step reads (``permuted``: a seeded permutation per epoch,
  so resumable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hubprune.calibration import TokenWindows, bos_id, calibration_windows, check_disjoint
from hubprune.config import ChatDataConfig, HealConfig
from hubprune.eval.chat import eval_prompts
from hubprune.generation import (
    cache_file,
    generate,
    generating,
    has_chat_template,
    model_fingerprint,
    render,
    write_cache,
)

logger = logging.getLogger(__name__)


def healing_text(config: HealConfig, tokenizer, data: Any, teacher: nn.Module | None) -> tuple[str, str]:
    """What healing reads, "chat" or "prose", and why (``HealConfig.text``)."""
    given = data is not None or any(getattr(config.data, k) is not None for k in ("texts", "files", "dataset"))
    if config.text == "prose":
        return "prose", "heal.text is prose"
    problem = (
        "the tokenizer has no chat template"
        if not has_chat_template(tokenizer)
        else "the original model is not at hand to write the conversations"
        if teacher is None
        else None
    )
    if config.text == "chat":
        if problem:
            raise ValueError(
                f"heal.text chat cannot be done: {problem}; use heal.text prose (--text prose on the command line)"
            )
        if given and not config.mix:
            raise ValueError(
                "heal.text chat writes its own conversations, but healing text was given too; "
                "give heal.text prose to heal on that text alone, or heal.mix > 0 to mix it into "
                "the conversations"
            )
        return "chat", "heal.text is chat"
    if given:
        return "prose", "healing text was given"
    if problem:
        return "prose", problem
    return "chat", "the model has a chat template (heal.text auto)"


def healing_windows(
    tokenizer,
    config: HealConfig,
    data: Any,
    world: int,
    teacher: nn.Module | None,
    progress: bool,
    student: nn.Module | None = None,
) -> TokenWindows:
    """The windows a healing run of ``config.steps`` steps on ``world`` processes reads (``healing_text``
    says chat or prose): prose from ``data`` or ``config.data`` (train split), and/or conversations the
    original (``teacher``) writes, with the pruned model's (``student``) own answers where asked."""
    needed = config.steps * config.batch_size * config.grad_accum * world
    if config.refit:
        needed = max(needed, refit_window_count(config))
    kind, reason = healing_text(config, tokenizer, data, teacher)
    logger.info("healing on %s text: %s", kind, reason)
    if kind == "prose" and config.on_policy:
        raise ValueError(
            f"heal.on_policy needs chat healing, and this run heals on prose ({reason}); "
            "set heal.on_policy: 0 (--on-policy 0), or heal a chat model with heal.text chat"
        )
    prose_count = needed if kind == "prose" else round(config.mix * needed)
    prose: TokenWindows | None = None
    if prose_count:
        sizes = replace(config.data, n_samples=prose_count, seq_len=config.seq_len)
        prose = calibration_windows(tokenizer, data, sizes, corpus_split="train")
    if kind == "prose":
        if prose is None:
            raise ValueError(f"healing for {config.steps} steps reads no text")
        windows = prose
    else:
        conversations = self_chat(
            teacher, tokenizer, config.chat, count=config.chat.conversations, seed=config.seed, progress=progress
        )
        if config.chat.student_answers and student is not None:
            own = student_chat(
                student, tokenizer, conversations[: config.chat.student_answers], config.chat, progress=progress
            )
            conversations = [c for pair in zip(own, conversations) for c in pair] + conversations[len(own) :]
        windows = chat_windows(tokenizer, conversations, needed - prose_count, config.seq_len)
        if prose is not None:  # prose learns every token
            windows = TokenWindows(
                torch.cat([windows.ids, prose.ids]),
                windows.texts + prose.texts,
                f"{windows.source}, mixed with {len(prose.ids)} windows of the {prose.source}",
                torch.cat([_loss_mask(windows), torch.ones_like(prose.ids, dtype=torch.bool)]),
                windows.prompts,
            )
    if len(windows.ids) < needed:
        logger.info(
            "healing text fills %d windows; %d steps read it %.1f times",
            len(windows.ids),
            config.steps,
            needed / len(windows.ids),
        )
    return windows


def refit_window_count(config: HealConfig) -> int:
    """How many windows the refit reads: the first ``refit_tokens`` of the healing text, in whole windows."""
    return -(-config.refit_tokens // config.seq_len)


def _loss_mask(windows: TokenWindows) -> torch.Tensor:
    """The windows' loss mask; every token where they have none."""
    if windows.loss_mask is None:
        return torch.ones_like(windows.ids, dtype=torch.bool)
    return windows.loss_mask


def micro_batch(
    windows: TokenWindows, index: int, config: HealConfig, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token ids, loss mask or None) of this process's share of global micro-batch ``index``.

    Micro-batch ``index`` is windows [index*B*world, (index+1)*B*world) of a seeded permutation per
    epoch; process ``rank`` takes its B of them. A pure function of ``index``, so a resumed run reads
    what the interrupted one would have read.
    """
    n, size = len(windows.ids), config.batch_size * world
    positions = [index * size + rank * config.batch_size + i for i in range(config.batch_size)]
    picked = torch.tensor([permuted(position, n, config.seed) for position in positions])
    return windows.ids[picked], None if windows.loss_mask is None else windows.loss_mask[picked]


def permuted(position: int, n: int, seed: int) -> int:
    """Item ``position`` of passes over ``range(n)``, each pass a permutation seeded by ``seed`` + its number."""
    epoch, offset = divmod(position, n)
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[offset])


def user_prefix(tokenizer) -> str:
    """The template's text up to where a user's message begins (what Magpie gives the model)."""
    marker = "\x00hubprune-user-message\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text[: text.index(marker)]


@torch.no_grad()
def self_chat(
    original,
    tokenizer,
    config: ChatDataConfig,
    *,
    count: int,
    seed: int = 0,
    progress: bool = True,
    cache: bool = True,
) -> list[dict]:
    """``count`` conversations the original writes: Magpie-style questions (or ``config.prompts``' lines)
    and sampled answers. Cached on disk under ``cache_dir()/chat-data``; a rerun reuses the file.

    Example: ``self_chat(original, tok, ChatDataConfig(), count=64)[0]["answer"]``
    """
    if not has_chat_template(tokenizer):
        raise ValueError(
            "chat healing needs a chat template, and this tokenizer has none; heal on prose "
            "(heal.text: prose, or --text prose)"
        )
    given = _prompt_file(config.prompts) if config.prompts != "magpie" else None
    key = _cache_key(original, config, count, seed, given)
    path = cache_file(key, "chat-data")
    if cache and path.is_file():
        logger.info("reusing the chat healing set in %s", path)
        return json.loads(path.read_text())["conversations"]
    held_out, _ = eval_prompts(None)
    if given is not None:
        check_disjoint(given, held_out, "the chat healing prompts and the held-out chat evaluation prompts")
        prompts = given[:count]
    else:
        prompts = magpie_prompts(original, tokenizer, count, config, seed=seed, exclude=held_out, progress=progress)
    answers = generate(
        original,
        tokenizer,
        render(tokenizer, prompts, chat=True),
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        batch_size=config.batch_size,
        seed=seed + 1,
        progress=progress,
        desc="answers by the original",
    )
    conversations = [c for c in _conversations(tokenizer, prompts, answers) if c["answer"]]
    if cache:
        write_cache(path, {"key": key, "config": asdict(config), "conversations": conversations})
        logger.info("chat healing set (%d conversations) cached in %s", len(conversations), path)
    return conversations


@torch.no_grad()
def student_chat(
    student, tokenizer, conversations: list[dict], config: ChatDataConfig, *, progress: bool = True
) -> list[dict]:
    """The same questions answered greedily by the pruned model itself (``ChatDataConfig.student_answers``)."""
    prompts = [c["prompt"] for c in conversations]
    with generating(student):
        answers = generate(
            student,
            tokenizer,
            render(tokenizer, prompts, chat=True),
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            progress=progress,
            desc="answers by the pruned model",
        )
    return [{**c, "by": "pruned"} for c in _conversations(tokenizer, prompts, answers)]


def _conversations(tokenizer, prompts: list[str], answers: list) -> list[dict]:
    """The records of the healing set: each prompt with its generated answer as text, and whether it ended."""
    return [
        {"prompt": p, "answer": tokenizer.decode(a.tokens, skip_special_tokens=True).strip(), "finished": a.finished}
        for p, a in zip(prompts, answers)
    ]


def magpie_prompts(
    model,
    tokenizer,
    count: int,
    config: ChatDataConfig,
    *,
    seed: int = 0,
    exclude: Sequence[str] = (),
    progress: bool = True,
) -> list[str]:
    """``count`` distinct user questions the model writes when given only its template's user-turn prefix."""
    prefix = tokenizer(user_prefix(tokenizer), add_special_tokens=False)["input_ids"]
    banned = {" ".join(p.split()).lower() for p in exclude}
    found: dict[str, str] = {}
    bar = tqdm(total=count, desc="questions by the original (Magpie)", unit="q", disable=not progress, leave=False)
    for attempt in range(20 * math.ceil(count / config.batch_size)):  # a model that rarely ends its question stops
        if len(found) >= count:
            break
        batch = generate(
            model,
            tokenizer,
            [prefix] * config.batch_size,
            max_new_tokens=config.max_question_tokens,
            temperature=config.question_temperature,
            top_p=1.0,
            batch_size=config.batch_size,
            seed=seed + 1000 * attempt,
        )
        for g in batch:
            text = tokenizer.decode(g.tokens, skip_special_tokens=True).strip()
            norm = " ".join(text.split()).lower()
            if g.finished and 10 <= len(text) <= 600 and norm not in banned and norm not in found:
                found[norm] = text
                bar.update(1)
    bar.close()
    if len(found) < count:
        logger.warning("the original wrote %d distinct questions of the %d asked for", len(found), count)
    return list(found.values())[:count]


def chat_windows(tokenizer, conversations: list[dict], n_samples: int, seq_len: int) -> TokenWindows:
    """Conversations through the chat template, joined and cut into windows of ``seq_len`` tokens;
    ``loss_mask`` marks the answer tokens (their end-of-turn token included)."""
    stream: list[int] = []
    marks: list[int] = []
    texts: list[str] = []
    bos = bos_id(tokenizer)
    body = seq_len - (bos is not None)
    for c in conversations:
        if len(stream) >= n_samples * body:
            break
        messages = [{"role": "user", "content": c["prompt"]}, {"role": "assistant", "content": c["answer"]}]
        prefix = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prefix):
            full = prefix + c["answer"] + (tokenizer.eos_token or "")
        head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        answer = tokenizer(full[len(prefix) :], add_special_tokens=False)["input_ids"]
        stream += head + answer
        marks += [0] * len(head) + [1] * len(answer)
        texts.append(full)
    count = min(n_samples, len(stream) // body)
    if count == 0:
        raise ValueError(f"the chat healing set holds {len(stream)} tokens, less than one window of {seq_len}")
    ids = torch.tensor(stream[: count * body]).view(count, body)
    mask = torch.tensor(marks[: count * body], dtype=torch.bool).view(count, body)
    if bos is not None:
        ids = torch.cat([torch.full((count, 1), bos), ids], 1)
        mask = torch.cat([torch.zeros(count, 1, dtype=torch.bool), mask], 1)
    own = sum(c.get("by") == "pruned" for c in conversations)
    source = f"{len(conversations) - own} conversations written by the original" + (
        f" and {own} of its questions answered by the pruned model" if own else ""
    )
    prompts = [c["prompt"] for c in conversations if c.get("by") != "pruned"]
    return TokenWindows(ids, texts, source, loss_mask=mask, prompts=prompts)


def _prompt_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"chat prompt file {path} does not exist; give a UTF-8 text file with one prompt a "
            "line, or prompts: magpie to let the original write them"
        )
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"chat prompt file {path} holds no prompts (one a line)")
    return prompts


def _cache_key(model, config: ChatDataConfig, count: int, seed: int, given: list[str] | None) -> str:
    settings = {k: v for k, v in asdict(config).items() if k != "student_answers"}  # the original's set only
    parts = [
        model_fingerprint(model),
        settings,
        count,
        seed,
        hashlib.sha256("\n".join(given).encode()).hexdigest() if given else None,
        1,
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
