"""Evaluate a model or a pruned folder beside its original: what ``hubprune eval`` runs.

``evaluate_folder`` checks every option before a model is loaded, scores the model and (for a
folder with ``hubprune.json``) its original the same way, and optionally the chat fidelity of the
answers; ``FolderEvaluation.record`` writes the figures into the folder's ``hubprune.json`` and
re-renders its model card, unless the card was edited by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hubprune.card import readme_was_edited, write_card
from hubprune.eval.chat import ChatFidelity, chat_fidelity
from hubprune.eval.evaluate import evaluate_model
from hubprune.eval.harness import load_tasks, parse_data
from hubprune.eval.results import EvalResult
from hubprune.eval.tasks import TASKS
from hubprune.generation import has_chat_template
from hubprune.loading import load_model
from hubprune.record import RECORD_FILE, PruneRecord


@dataclass
class FolderEvaluation:
    """The scores of one ``evaluate_folder`` call.

    ``results`` maps ``"pruned"`` and ``"original"`` (a hubprune folder, with its baseline) or
    ``"model"`` (any other model) to an ``EvalResult``; ``chat`` is the chat fidelity, when asked;
    ``prune_record`` the folder's hubprune.json as read before the evaluation (None for other models).
    """

    results: dict[str, EvalResult]
    chat: ChatFidelity | None = None
    backend: str = "hubprune"
    prune_record: PruneRecord | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        data = {name: result.to_dict() for name, result in self.results.items()}
        if self.chat is not None:
            data["chat"] = self.chat.to_dict()
        return data

    def table(self) -> str:
        if "original" in self.results:
            text = self.results["original"].table(self.results["pruned"], names=("original", "pruned"))
        else:
            text = next(iter(self.results.values())).table()
        return text + ("\n" + self.chat.table() if self.chat is not None else "")

    def record(self, folder: str | os.PathLike, command: str) -> bool | None:
        """Write the figures into ``folder``'s hubprune.json (with the ``command`` that measured
        them) and re-render its card. Returns True when the card was rewritten, False when it was
        edited by hand and left alone, None when there is nothing to record (no hubprune.json, or
        no original measured beside it)."""
        if self.prune_record is None or "original" not in self.results:
            return None
        folder = Path(folder)
        evaluation = {**self.to_dict(), "heldout": self.results["pruned"].heldout, "command": command}
        if self.backend != "hubprune":
            evaluation["backend"] = self.backend
        self.prune_record.evaluation = evaluation
        self.prune_record.save(folder)
        if readme_was_edited(folder):
            return False
        write_card(folder, repo_id=folder.name)
        return True


def evaluate_folder(
    model: str | os.PathLike,
    tasks: list[str] | str,
    *,
    limit: int | None = None,
    sample: int | None = None,
    backend: str = "hubprune",
    data: list[str] | None = None,
    baseline: bool = True,
    chat: bool = False,
    continuations: bool = False,
    chat_prompts: int = 128,
    max_new_tokens: int = 128,
    dtype: str = "float32",
    device: str = "auto",
    progress: bool = True,
) -> FolderEvaluation | None:
    """Score ``model`` (a Hub id, folder or .gguf) on ``tasks`` and held-out perplexity.

    A folder written by hubprune is scored beside its original (the model and revision its
    hubprune.json names) unless ``baseline`` is False. ``chat`` adds the chat fidelity of its
    answers against the original's on held-out prompts; ``continuations`` the same on plain
    continuations of held-out prose, for models without a chat template. ``data`` gives local task
    data to the ``lm-eval`` backend, as ``TASK=PATH`` strings. Returns None on the processes that
    do not report under ``accelerate launch``.

    Example: ``evaluate_folder("out/smollm2-24l", ["arc_easy"], sample=500, chat=True).table()``
    """
    import torch
    from accelerate import PartialState

    # Every check below runs before a model is loaded.
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    task_data = None
    if backend == "lm-eval":  # any harness task; names and data are checked here
        task_data = parse_data(data)
        load_tasks(tasks, task_data)
    elif data:
        raise ValueError(
            'local task data (--data) is for the harness tasks; pass backend="lm-eval" (--backend lm-eval)'
        )
    elif unknown := [t for t in tasks if t not in TASKS]:
        raise ValueError(
            f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)} (or any harness task with --backend lm-eval)"
        )
    folder = Path(model)
    record = PruneRecord.load(folder) if (folder / RECORD_FILE).is_file() else None
    fidelity_asked = chat or continuations
    if fidelity_asked and record is None:
        raise ValueError(
            f"--chat measures a pruned model against its original, and {model} has no "
            f"{RECORD_FILE}; give a folder written by hubprune prune or heal"
        )
    if fidelity_asked and not baseline:
        raise ValueError(
            "chat fidelity (--chat) compares with the original, so it needs the baseline (no --no-baseline)"
        )

    # Initialises torch.distributed under accelerate launch (gloo on a CPU-only machine).
    main_process = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    pruned, tokenizer, _ = load_model(str(model), dtype=dtype, device=device)
    if chat and not has_chat_template(tokenizer):
        raise ValueError(
            f"{model}'s tokenizer has no chat template, so there are no chat answers to "
            "score; use --continuations (greedy continuations of held-out prose) instead"
        )

    def score(model, tokenizer) -> EvalResult:  # the pruned model and its original, the same way
        return evaluate_model(
            model, tokenizer, tasks, limit=limit, sample=sample, progress=progress, backend=backend, data=task_data
        )

    results = {"pruned" if record else "model": score(pruned, tokenizer)}
    if not fidelity_asked:
        del pruned
    original = None
    if record is not None and baseline:
        original, original_tokenizer, _ = load_model(
            record.base_model, revision=record.original_revision, dtype=dtype, device=device
        )
        results["original"] = score(original, original_tokenizer)
    fidelity = None
    if fidelity_asked:
        fidelity = chat_fidelity(
            pruned,
            original,
            tokenizer,
            n_prompts=chat_prompts,
            max_new_tokens=max_new_tokens,
            chat=chat,
            progress=progress,
        )
    if not main_process:  # every process evaluated its share; one reports
        return None
    return FolderEvaluation(results, fidelity, backend, record)
