"""Any lm-evaluation-harness task, scored by the harness itself on a model hubprune loaded.

``hubprune eval --backend lm-eval --tasks NAME[,NAME]``: the model and tokenizer from
``hubprune.loading.load_model`` are wrapped in the harness's ``HFLM`` and its ``simple_evaluate``
runs the named tasks (any registered task, group or tag, or a task YAML file), zero-shot unless
the task's YAML says otherwise. The results come back as a ``hubprune.eval.results.EvalResult``, so
the table, ``hubprune.json`` and the model card read them as they read the built-in tasks.

Tasks whose metrics include ``acc`` (output types multiple_choice and loglikelihood) are
recorded: ``acc`` and ``acc_norm`` as the harness reports them (where it reports no
``acc_norm``, as for boolq or a group such as mmlu, ``acc`` stands in for it), with chance as
the mean of 1/#choices over the questions scored (0 for a loglikelihood task). Generated-text
tasks (generate_until) are refused: their metrics do not fit a TaskScore.

Offline, a task reads its data from the datasets cache, or from a local copy named with
``data={"arc_easy": "arc_easy.jsonl"}`` (``--data arc_easy=arc_easy.jsonl``): the rows of the
split the task scores, in the schema of the Hub dataset its YAML reads (JSON lines, JSON, CSV,
Parquet, or a ``datasets.save_to_disk`` folder).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hubprune.eval.results import EvalResult, TaskScore

logger = logging.getLogger(__name__)

INSTALL = "pip install 'hubprune[harness]' (lm-evaluation-harness: lm_eval==0.4.13)"
_RECORDED = ("multiple_choice", "loglikelihood")  # the output types whose metrics include acc
_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def require_harness() -> None:
    """Raise ModuleNotFoundError, saying how to install it, where lm-evaluation-harness is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ModuleNotFoundError(f"the lm-eval backend needs lm-evaluation-harness; install it with {INSTALL}")


def parse_data(items: Sequence[str] | None) -> dict[str, Path]:
    """``["arc_easy=rows.jsonl"]`` -> ``{"arc_easy": Path("rows.jsonl")}``, each path checked.

    Example: ``parse_data(["piqa=piqa.jsonl"])``
    """
    data: dict[str, Path] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--data takes TASK=PATH (e.g. arc_easy=arc_easy.jsonl), got {item!r}")
        if not Path(path).exists():
            raise FileNotFoundError(f"--data {item}: {path} does not exist")
        data[name] = Path(path)
    return data


def _local_data(name: str, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Overrides that make the task read ``path`` as the split it scores, and nothing else."""
    split = config.get("test_split") or config.get("validation_split")
    if split is None:
        raise ValueError(f"harness task {name!r} names neither a test nor a validation split to read --data into")
    if config.get("num_fewshot"):
        raise ValueError(
            f"harness task {name!r} takes {config['num_fewshot']} few-shot examples from its own training "
            "data, which --data does not give; use the datasets cache for it instead"
        )
    if path.is_dir():  # a datasets.save_to_disk folder: its Arrow files
        files = sorted(str(f) for f in path.glob("*.arrow"))
        if not files:
            raise ValueError(f"--data {name}={path}: a folder must be a datasets.save_to_disk folder (*.arrow files)")
        builder = "arrow"
    elif path.suffix in _FORMATS:
        files, builder = [str(path)], _FORMATS[path.suffix]
    else:
        raise ValueError(f"--data {name}={path}: give a {', '.join(_FORMATS)} file or a save_to_disk folder")
    return {
        "dataset_path": builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: files}},
        "training_split": None,
        "fewshot_split": None,
        "validation_split": split if split == config.get("validation_split") else None,
        "test_split": split if split == config.get("test_split") else None,
    }


@functools.cache
def _task_manager():
    """The harness's index of its task YAMLs (built once per process: it takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def load_tasks(names: Sequence[str], data: Mapping[str, Path] | None = None) -> list:
    """The harness's Task and Group objects for ``names``, each with its data loaded.

    A name the harness does not know, or a task whose dataset is not available here, raises
    ValueError in one line that names the task and what it needs.

    Example: ``load_tasks(["arc_easy"], {"arc_easy": Path("arc_easy.jsonl")})``
    """
    require_harness()
    from lm_eval.tasks._yaml_loader import load_yaml

    data = dict(data or {})
    unused = sorted(set(data) - set(names))
    if unused:
        raise ValueError(f"--data names {', '.join(unused)}, which --tasks does not")
    manager = _task_manager()
    objects = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None and not (Path(name).suffix in (".yaml", ".yml") and Path(name).is_file()):
            raise ValueError(f"unknown harness task {name!r}; `lm_eval ls tasks` lists the names")
        spec: str | dict = name
        if name in data:
            if entry is None or entry.yaml_path is None or entry.kind.name != "TASK":
                raise ValueError(f"--data gives the rows of one registered task, and {name!r} is not one")
            config = load_yaml(entry.yaml_path)
            spec = {**config, **_local_data(name, config, data[name])}
        try:
            loaded = manager.load([spec])
        except OSError as err:  # ConnectionError, FileNotFoundError: datasets could not find the data
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"harness task {name!r} cannot read its dataset here ({reason}); load it once where the Hub "
                f"is reachable so that it sits in the datasets cache (HF_DATASETS_CACHE), or give a local copy "
                f"of the split it scores with --data {name}=FILE"
            ) from None
        for task in loaded["tasks"].values():
            kind = task.get_config("output_type")
            if kind not in _RECORDED:
                raise ValueError(
                    f"harness task {task.task_name!r} is of type {kind}, scored on more than a choice's "
                    f"log-likelihood; hubprune records {' and '.join(_RECORDED)} tasks (acc): run lm_eval for it"
                )
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        else:
            objects.extend(loaded["tasks"].values())
    return objects


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # the harness writes "N/A"


def _metric(metrics: Mapping[str, Any], name: str) -> tuple[float | None, float | None]:
    """(value, stderr) of ``name`` under the first filter that reports it (``acc,none`` first)."""
    keys = sorted((k for k in metrics if k.split(",")[0] == name), key=lambda k: k != f"{name},none")
    if not keys:
        return None, None
    _, _, filt = keys[0].partition(",")
    return _number(metrics[keys[0]]), _number(metrics.get(f"{name}_stderr,{filt}"))


def scores(results: Mapping[str, Any], names: Sequence[str]) -> EvalResult:
    """An EvalResult from ``simple_evaluate``'s results (run with ``log_samples=True``): one
    TaskScore per name, a task or a group (scored over all its tasks' questions)."""
    groups = results.get("group_subtasks", {})

    def leaves(task: str) -> list[str]:
        return [leaf for sub in groups[task] for leaf in leaves(sub)] if task in groups else [task]

    result = EvalResult()
    for name in names:
        acc, acc_stderr = _metric(results["results"][name], "acc")
        if acc is None:
            raise ValueError(
                f"harness task {name!r} reports {', '.join(k for k in results['results'][name] if ',' in k)}, "
                "not acc: hubprune records multiple-choice tasks; run lm_eval itself for this one"
            )
        acc_norm, acc_norm_stderr = _metric(results["results"][name], "acc_norm")
        if acc_norm is None:
            acc_norm, acc_norm_stderr = acc, acc_stderr
        samples = [
            (results["configs"][leaf]["output_type"], s) for leaf in leaves(name) for s in results["samples"][leaf]
        ]
        # chance: 1/#choices for a multiple-choice question, 0 for a continuation that must be the greedy one
        chance = sum(1 / len(s["arguments"]) if kind == "multiple_choice" else 0.0 for kind, s in samples)
        chance /= len(samples)
        result.tasks[name] = TaskScore(name, acc, acc_norm, acc_stderr, acc_norm_stderr, len(samples), chance)
    return result


def evaluate_harness(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    data: Mapping[str, Path] | None = None,
    limit: int | None = None,
    sample: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Score ``model`` on harness tasks with lm-evaluation-harness's HFLM and ``simple_evaluate``.

    ``limit`` takes the first questions of each task (the harness's ``--limit``); ``sample``
    that many evenly spaced ones, as the built-in tasks do. Under ``accelerate launch`` every
    process scores every question (HFLM does not split a model it is handed) and the harness
    reports on the main one; the others return an empty result.

    Example: ``evaluate_harness(model, tokenizer, ["arc_easy"], limit=100).table()``
    """
    require_harness()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if limit is not None and sample is not None:
        raise ValueError("give limit (the first questions) or sample (evenly spaced questions), not both")
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    objects = load_tasks(tasks, data)
    samples = None
    if sample is not None:
        samples = {}
        for task in _leaf_tasks(objects):
            size = len(task.eval_docs)
            samples[task.task_name] = [i * size // sample for i in range(min(sample, size))]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=objects, limit=limit, samples=samples, log_samples=True, task_manager=_task_manager()
    )
    if results is None:  # not the main process
        return EvalResult()
    return scores(results, [_name(obj) for obj in objects])


def _name(obj) -> str:
    from lm_eval.api.group import Group

    return obj.name if isinstance(obj, Group) else obj.task_name


def _leaf_tasks(objects: list) -> list:
    from lm_eval.api.group import Group

    leaves: list = []
    for obj in objects:
        leaves.extend(obj.get_all_tasks() if isinstance(obj, Group) else [obj])
    return leaves
