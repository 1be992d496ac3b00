"""hubprune's zero-shot scoring checked against lm-evaluation-harness itself (its task YAMLs and HFLM).

The harness loads each task from its own YAML (prompt template, choices, process_docs), with the
data pointed at the same local rows hubprune reads (its Hub datasets are not reachable here). On
the real SmolLM2, for the first 50 questions of ARC-Easy, PIQA and HellaSwag: the same requests
(context and continuation strings), per-request log-likelihoods within 1e-4, and the same
acc and acc_norm.
"""

from __future__ import annotations

import json
import math
import string

import pytest

from hubprune.eval.scoring import loglikelihoods, score_docs
from hubprune.eval.tasks import arc_rows, load_task, olmo_rows

pytestmark = pytest.mark.slow
N = 50


def _harness_rows(task: str) -> list[dict]:
    """The first N questions in the schema of the Hub dataset the harness YAML reads."""
    if task == "arc_easy":
        return [{"question": r["question"], "choices": {"text": r["choices"],
                                                        "label": list(string.ascii_uppercase[: len(r["choices"])])},
                 "answerKey": string.ascii_uppercase[r["gold"]]} for r in arc_rows("arc_easy", N)]
    folder = {"piqa": "piqa/plain_text/validation", "hellaswag": "hellaswag/none/validation"}[task]
    return olmo_rows(folder, N)


def _harness_task(name: str, tmp_path):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TaskManager()._entry(name).yaml_path)  # the task's YAML, !function helpers resolved
    split = config.get("test_split") or config["validation_split"]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _harness_rows(name)))
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(path)}},
                  training_split=None, fewshot_split=None)
    if config.get("test_split"):  # scored on the test split (ARC): no validation split to read
        config["validation_split"] = None
    task = ConfigurableTask(config=config)
    task.build_all_requests(limit=N, rank=0, world_size=1)
    return task


@pytest.mark.parametrize("name", ["arc_easy", "piqa", "hellaswag"])
def test_requests_log_likelihoods_and_accuracy_equal_the_harness(name, smollm2, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm_eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = smollm2.model, smollm2.tokenizer
    task = _harness_task(name, tmp_path)
    instances = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
    docs = load_task(name, limit=N)
    ours = [r for doc in docs for r in doc.requests]
    assert [tuple(i.arguments) for i in instances] == ours  # same prompts and choices, in the same order

    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    theirs = [ll for ll, _ in harness.loglikelihood(instances)]
    mine = loglikelihoods(model, tokenizer, ours, batch_size=8)
    worst = max(abs(a - b) for a, b in zip(mine, theirs))
    assert worst < 1e-4, f"log-likelihoods differ by up to {worst:.2e}"

    for instance, ll in zip(instances, theirs):
        instance.resps = [(ll, False)]
    per_doc = {}
    for instance in instances:
        per_doc.setdefault(instance.doc_id, []).append(instance)
    results = [task.process_results(group[0].doc, [i.resps[0] for i in group]) for _, group in sorted(per_doc.items())]
    score = score_docs(name, docs, mine)
    assert math.isclose(score.acc, sum(r["acc"] for r in results) / len(results))
    assert math.isclose(score.acc_norm, sum(r["acc_norm"] for r in results) / len(results))
