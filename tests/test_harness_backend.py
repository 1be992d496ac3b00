"""`hubprune eval --backend lm-eval`: any harness task, scored by lm-evaluation-harness itself on the
model hubprune loaded, recorded as the built-in tasks are. Offline, a task reads a local copy of its
data (`--data TASK=FILE`); without one it fails in one line that names the task and the way out."""

from __future__ import annotations

import json
import string
import sys

import pytest

from hubprune.cli import main
from hubprune.eval.tasks import arc_rows

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'hubprune[harness]')")
N = 12


@pytest.fixture(scope="module")
def arc_easy_file(tmp_path_factory):
    """The first N ARC-Easy test questions in the schema of the Hub dataset the harness YAML reads."""
    rows = [
        {"question": r["question"], "answerKey": string.ascii_uppercase[r["gold"]],
         "choices": {"text": r["choices"], "label": list(string.ascii_uppercase[: len(r["choices"])])}}
        for r in arc_rows("arc_easy", N)
    ]
    path = tmp_path_factory.mktemp("harness-data") / "arc_easy.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_harness_scores_equal_the_built_in_backend_and_reach_the_record_and_card(
    tiny_model_dir, arc_easy_file, tmp_path, capsys
):
    from huggingface_hub import ModelCard

    out = tmp_path / "p"
    assert main(["prune", str(tiny_model_dir), "--layers", "1,2", "--out", str(out), "-q", "--n-samples", "2",
                 "--seq-len", "16"]) == 0
    assert main(["eval", str(out), "--tasks", "arc_easy", "--limit", str(N), "--out", str(tmp_path / "ours.json"),
                 "-q"]) == 0
    assert main(["eval", str(out), "--backend", "lm-eval", "--tasks", "arc_easy", "--data",
                 f"arc_easy={arc_easy_file}", "--out", str(tmp_path / "harness.json"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "kept above chance" in printed and "held-out perplexity" in printed
    ours, theirs = (json.loads((tmp_path / f).read_text()) for f in ("ours.json", "harness.json"))
    for model in ("pruned", "original"):
        mine, harness = ours[model]["tasks"]["arc_easy"], theirs[model]["tasks"]["arc_easy"]
        assert harness["n"] == mine["n"] == N
        for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "chance"):
            assert harness[key] == pytest.approx(mine[key], abs=1e-9), (model, key)
        assert theirs[model]["perplexity"] == pytest.approx(ours[model]["perplexity"])
    record = json.loads((out / "hubprune.json").read_text())
    assert record["evaluation"]["backend"] == "lm-eval"
    assert "--backend lm-eval" in record["evaluation"]["command"]
    card = ModelCard.load(out / "README.md")
    assert {r.dataset_type for r in card.data.eval_results} == {"arc_easy", "heldout"}
    assert "scored by lm-evaluation-harness itself" in card.text


def test_a_task_without_local_data_fails_in_one_line_naming_it(tiny_model_dir, capsys):
    """Offline (the suite runs with HF_HUB_OFFLINE=1), before any model is loaded."""
    assert main(["eval", str(tiny_model_dir), "--backend", "lm-eval", "--tasks", "arc_easy", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hubprune: error: harness task 'arc_easy' cannot read its dataset here")
    assert "allenai/ai2_arc" in err and "HF_DATASETS_CACHE" in err and "--data arc_easy=FILE" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "no_such_task"], "unknown harness task 'no_such_task'"),
        (["--tasks", "arc_easy", "--data", "piqa=x.jsonl"], "x.jsonl does not exist"),
        (["--tasks", "arc_easy", "--data", "arc_easy"], "--data takes TASK=PATH"),
    ],
)
def test_bad_harness_arguments_fail_in_one_line(tiny_model_dir, args, message, capsys):
    assert main(["eval", str(tiny_model_dir), "--backend", "lm-eval", *args, "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_data_names_a_task_it_does_not_evaluate(tiny_model_dir, arc_easy_file, capsys):
    assert main(["eval", str(tiny_model_dir), "--backend", "lm-eval", "--tasks", "arc_easy", "--data",
                 f"arc_easy={arc_easy_file}", f"piqa={arc_easy_file}", "-q"]) == 2
    assert "--data names piqa, which --tasks does not" in capsys.readouterr().err


def test_data_needs_the_lm_eval_backend(tiny_model_dir, arc_easy_file, capsys):
    assert main(["eval", str(tiny_model_dir), "--tasks", "arc_easy", "--data", f"arc_easy={arc_easy_file}"]) == 2
    assert "(--backend lm-eval)" in capsys.readouterr().err


def test_without_the_harness_installed_it_says_how_to_install_it(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # find_spec then answers None, as when it is not installed
    assert main(["eval", str(tiny_model_dir), "--backend", "lm-eval", "--tasks", "arc_easy", "-q"]) == 2
    assert "pip install 'hubprune[harness]'" in capsys.readouterr().err


def test_a_generated_text_task_is_refused_before_any_model_is_loaded(tiny_model_dir, arc_easy_file, tmp_path,
                                                                     capsys):
    """A task YAML file is a task name too; a generate_until task's metrics do not fit a TaskScore."""
    yaml_file = tmp_path / "arc_answer.yaml"
    yaml_file.write_text(
        "task: arc_answer\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {arc_easy_file}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answerKey}}"\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    assert main(["eval", str(tiny_model_dir), "--backend", "lm-eval", "--tasks", str(yaml_file), "-q"]) == 2
    assert "harness task 'arc_answer' is of type generate_until" in capsys.readouterr().err
