"""Evaluate a model: zero-shot tasks (built in, or any lm-evaluation-harness task) and held-out perplexity.

``evaluate_model`` is what ``hubprune eval`` runs; ``evaluate_tasks`` scores the built-in tasks
(``hubprune.eval.tasks``) the way the harness does (``hubprune.eval.scoring``); both return an
``EvalResult`` (``hubprune.eval.results``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from hubprune.eval.harness import evaluate_harness
from hubprune.eval.perplexity import HELDOUT, heldout_windows, perplexity
from hubprune.eval.results import EvalResult
from hubprune.eval.scoring import loglikelihoods, score_docs
from hubprune.eval.tasks import DEFAULT_TASKS, TASKS, load_task

logger = logging.getLogger(__name__)


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


def evaluate_model(
    model,
    tokenizer,
    tasks: Iterable[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    sample: int | None = None,
    heldout: dict | None = None,
    batch_size: int = 16,
    progress: bool = True,
    backend: str = "hubprune",
    data: dict | None = None,
):
    """Held-out perplexity plus zero-shot tasks, as one ``EvalResult``.

    ``backend="lm-eval"`` scores the tasks with lm-evaluation-harness itself (any harness task;
    ``data`` maps a task to a local copy of its data, see ``hubprune.eval.harness``); the default
    scores hubprune's built-in tasks the way the harness does.

    Example: ``evaluate_model(model, tokenizer, ["piqa"], limit=200).table()``
    """
    heldout = {**HELDOUT, **(heldout or {})}
    if backend == "lm-eval":
        result = evaluate_harness(
            model,
            tokenizer,
            list(tasks),
            data=data,
            limit=limit,
            sample=sample,
            batch_size=batch_size,
            progress=progress,
        )
    elif backend == "hubprune":
        if data:
            raise ValueError("local task data (--data) is for the lm-eval backend; the built-in tasks bring their own")
        result = evaluate_tasks(
            model, tokenizer, tasks, limit=limit, sample=sample, batch_size=batch_size, progress=progress
        )
    else:
        raise ValueError(f"unknown evaluation backend {backend!r}; choose hubprune or lm-eval")
    windows = heldout_windows(tokenizer, **heldout)
    result.perplexity = perplexity(model, windows.ids, progress=progress)
    result.heldout = f"{windows.ids.shape[0]} x {windows.ids.shape[1]} tokens of the {windows.source}"
    return result
