"""What a model writes: batched generation through its chat template, and the cache of what it wrote.

- ``render``: prompts -> token ids, through the chat template (ready for the answer) or as plain text.
- ``generate``: batched generation (left padding, KV cache), greedy or sampled; ``generating``: a model
  being trained, ready to generate for a while.
- ``model_fingerprint``, ``cache_file``, ``write_cache``: generated text is a function of the weights
  and the inputs, so it is cached under ``cache_dir()`` by a fingerprint of the weights: the original's
  answers to the held-out prompts (``hubprune.eval.chat``) and the conversations it writes for
  healing (``hubprune.heal.data``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hubprune.loading import cache_dir


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt: through the chat template (ready for the answer), or as plain text."""
    if not chat:
        return [tokenizer(p)["input_ids"] for p in prompts]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@dataclass
class Generated:
    tokens: list[int]  # the new tokens, up to and including the end token when one came
    finished: bool  # an end token came within max_new_tokens


def end_tokens(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (ids, mask), both [batch, longest], padded on the left so every row ends at the last column."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@contextmanager
def generating(model):
    """``model`` in eval mode with its KV cache on inside the block, then put back as it was (a model
    being trained, or kept without a cache for training, can generate in between)."""
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    try:
        yield model
    finally:
        model.train(was_training)
        model.config.use_cache = use_cache


@torch.no_grad()
def generate(
    model,
    tokenizer,
    inputs: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
) -> list[Generated]:
    """Continue each token list; batched with left padding and the KV cache. ``temperature`` 0 is greedy.

    Example: ``generate(model, tok, render(tok, ["Hi!"], chat=True), max_new_tokens=32)[0].tokens``
    """
    device = next(model.parameters()).device
    ends = end_tokens(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # similar lengths share a batch
    results: list[Generated | None] = [None] * len(inputs)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    batches = range(0, len(order), batch_size)
    for b in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        rows = [inputs[i] for i in order[b : b + batch_size]]
        ids, mask = left_pad(rows, pad, device)
        width = ids.shape[1]
        torch.manual_seed(seed + b)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=ends,
            pad_token_id=pad,
            use_cache=True,
            **sampling,
        )[:, width:].tolist()
        for index, new in zip(order[b : b + batch_size], out):
            end = next((k for k, t in enumerate(new) if t in ends), None)
            results[index] = Generated(new[: end + 1] if end is not None else new, end is not None)
    return results  # type: ignore[return-value]


def model_fingerprint(model) -> str:
    """sha256 of the config and of up to 4,096 evenly spaced values of every weight, with names and shapes:
    tells two models apart (a healed copy from its original too) without reading every byte."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_file(key: str, kind: str) -> Path:
    """Where generated text keyed by ``key`` is cached: ``cache_dir()/KIND/KEY.json``."""
    return cache_dir() / kind / f"{key}.json"


def write_cache(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", suffix=".json", delete=False) as f:
        json.dump(data, f)
    os.replace(f.name, path)
