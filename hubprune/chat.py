"""Chat healing data: conversations the original writes itself.

- ``self_chat``: the original writes the questions itself, Magpie-style (it is given only its
  template's user-turn prefix and samples the question), then samples the answers through the
  template. The set is cached under ``cache_dir()/chat-data``, keyed by the model's weights and
  the settings, so a rerun reuses it.
- ``chat_windows``: those conversations as token windows with a mask on the answer tokens, the
  only tokens healing learns (``hubprune.heal``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hubprune.calibration import TokenWindows, bos_id, check_disjoint
from hubprune.config import ChatDataConfig
from hubprune.eval.chat import eval_prompts
from hubprune.generation import cache_file, generate, has_chat_template, model_fingerprint, render, write_cache

logger = logging.getLogger(__name__)


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
    conversations = [
        {"prompt": p, "answer": tokenizer.decode(a.tokens, skip_special_tokens=True).strip(), "finished": a.finished}
        for p, a in zip(prompts, answers)
    ]
    conversations = [c for c in conversations if c["answer"]]
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
    was_training, use_cache = student.training, student.config.use_cache
    student.eval()
    student.config.use_cache = True
    answers = generate(
        student,
        tokenizer,
        render(tokenizer, prompts, chat=True),
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        progress=progress,
        desc="answers by the pruned model",
    )
    student.train(was_training)
    student.config.use_cache = use_cache
    return [
        {
            "prompt": p,
            "answer": tokenizer.decode(a.tokens, skip_special_tokens=True).strip(),
            "finished": a.finished,
            "by": "pruned",
        }
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
    return TokenWindows(ids, texts, source, loss_mask=mask)


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
