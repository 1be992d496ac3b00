"""`hubprune eval` on a pruned folder: the original is measured too, and the card gains an eval section."""

from __future__ import annotations

import json
import re

from huggingface_hub import ModelCard

from hubprune.cli import main


def test_eval_records_results_and_updates_the_card(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", str(tiny_model_dir), "--layers", "1,2", "--out", str(out), "-q", "--n-samples", "2",
                 "--seq-len", "16"]) == 0
    assert main(["eval", str(out), "--tasks", "arc_easy,piqa", "--limit", "4", "--out", str(tmp_path / "r.json"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^arc_easy +4 ", printed, re.M) and "kept above chance" in printed
    assert "held-out perplexity" in printed
    record = json.loads((out / "hubprune.json").read_text())
    assert set(record["evaluation"]) >= {"original", "pruned", "heldout", "command"}
    assert record["evaluation"]["pruned"]["tasks"]["piqa"]["n"] == 4
    card = ModelCard.load(out / "README.md")
    assert {r.dataset_type for r in card.data.eval_results} == {"arc_easy", "piqa", "heldout"}
    assert "## Quality before and after" in card.text
    assert json.loads((tmp_path / "r.json").read_text())["pruned"]["perplexity"] > 1


def test_eval_refuses_unknown_task(tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir), "--tasks", "squad", "-q"]) == 2
    assert "unknown task 'squad'" in capsys.readouterr().err


def test_eval_under_accelerate_launch_equals_one_process(tiny_model_dir, tmp_path):
    """Two gloo processes (accelerate launch --multi_gpu on a CPU machine) score their shares and agree."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    args = ["eval", str(tiny_model_dir), "--tasks", "arc_easy,piqa", "--limit", "6", "-q"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hubprune.cli", *args,
                             "--out", str(tmp_path / "two.json")],
                            capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = (json.loads((tmp_path / f).read_text())["model"] for f in ("one.json", "two.json"))
    assert one["tasks"] == two["tasks"]
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


def test_cli_leaves_the_process_group_before_exiting():
    """A launched process that exits with its gloo group alive aborts now and then (SIGABRT after
    its work is done); main() leaves the group, after a barrier when the command succeeded."""
    import torch.distributed as dist

    from hubprune.cli import _leave_process_group

    for wait in (True, False):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _leave_process_group(wait=wait)
        assert not dist.is_initialized()
    _leave_process_group(wait=True)  # no group: nothing to do


def test_eval_leaves_a_hand_edited_card_alone_and_still_records(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", str(tiny_model_dir), "--layers", "1", "--out", str(out), "-q", "--n-samples", "2",
                 "--seq-len", "16"]) == 0
    (out / "README.md").write_text("# my own card\n")
    assert main(["eval", str(out), "--tasks", "piqa", "--limit", "2", "-q"]) == 0
    assert "edited by hand" in capsys.readouterr().out
    assert (out / "README.md").read_text() == "# my own card\n"
    assert json.loads((out / "hubprune.json").read_text())["evaluation"]["pruned"]["tasks"]["piqa"]["n"] == 2


def test_evaluate_folder_in_python_scores_a_plain_model_without_recording(tiny_model_dir):
    from hubprune.eval.folder import evaluate_folder

    evaluation = evaluate_folder(tiny_model_dir, ["piqa"], limit=2, progress=False)
    assert list(evaluation.results) == ["model"] and evaluation.chat is None
    assert evaluation.results["model"].tasks["piqa"].n == 2
    assert evaluation.record(tiny_model_dir, command="test") is None  # nothing to compare with: nothing written
    assert not (tiny_model_dir / "hubprune.json").exists()
