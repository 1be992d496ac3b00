"""The CLI end to end on a tiny model: outputs, and every kind of bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_tokenizer, folder_digest
from hubprune.cli import main
from hubprune.config import Recipe

FAST = ["--n-samples", "2", "--seq-len", "16", "-q"]


def _prune(source, out, *args):
    return main(["prune", str(source), "--out", str(out), *FAST, *args])


def _assert_clean_failure(capsys, rc, out: Path, message: str):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("hubprune: error: "), err
    assert message in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary folder left behind"


def test_prune_writes_a_plain_checkpoint_with_record_and_recipe(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    before = folder_digest(tiny_model_dir)
    out = tmp_path / "pruned"
    assert _prune(tiny_model_dir, out, "--drop", "2") == 0
    assert "removed layers" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    record = json.loads((out / "hubprune.json").read_text())
    assert len(record["removed_layers"]) == 2 and record["metric"] == "angular_last"
    assert record["kept_layers"] == [i for i in range(6) if i not in record["removed_layers"]]
    assert record["base_model"] == str(tiny_model_dir.resolve()) and record["hubprune_version"]
    assert len(record["scores"]["values"]) == 5  # one score per start of a 2-layer block
    recipe = Recipe.load(out / "hubprune_recipe.yaml")
    assert recipe.prune.n_layers == 2 and recipe.calibration.n_samples == 2
    assert (out / "hubprune_scan.png").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin")) and (out / "model.safetensors").is_file()
    assert folder_digest(tiny_model_dir) == before


def test_run_replays_the_saved_recipe(tiny_model_dir, tmp_path):
    out = tmp_path / "first"
    assert _prune(tiny_model_dir, out, "--layers", "1,4") == 0
    assert main(["run", str(out / "hubprune_recipe.yaml"), "--out", str(tmp_path / "again"), "-q"]) == 0
    first, again = (json.loads((p / "hubprune.json").read_text()) for p in (out, tmp_path / "again"))
    assert first["removed_layers"] == again["removed_layers"] == [1, 4]
    assert first["metric"] == "explicit"


def test_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert _prune(tiny_model_dir, out, "--drop", "1") == 0
    stamp = (out / "hubprune.json").read_text()
    _assert_refused_existing = _prune(tiny_model_dir, out, "--drop", "2")
    assert _assert_refused_existing == 2 and "already exists" in capsys.readouterr().err
    assert (out / "hubprune.json").read_text() == stamp
    assert _prune(tiny_model_dir, out, "--drop", "2", "--overwrite") == 0
    assert len(json.loads((out / "hubprune.json").read_text())["removed_layers"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--drop", "6"], "cannot drop 6 of 6 layers"),
        (["--drop", "0"], "must be a positive integer"),
        (["--fraction", "1.2"], "strictly between 0 and 1"),
        (["--fraction", "0"], "strictly between 0 and 1"),
        (["--layers", "1,1"], "layer 1 more than once"),
        (["--layers", "9"], "layer 9 is out of range: this model has 6 layers, numbered 0 to 5"),
        (["--layers", "1,x"], "comma-separated 0-based integers"),
        (["--drop", "2", "--device", "cuda:7"], "no CUDA GPU is visible"),
    ],
)
def test_bad_prune_arguments(tiny_model_dir, tmp_path, capsys, args, message):
    before = folder_digest(tiny_model_dir)
    out = tmp_path / "out"
    _assert_clean_failure(capsys, _prune(tiny_model_dir, out, *args), out, message)
    assert folder_digest(tiny_model_dir) == before


def test_unknown_metric(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line, exit 2
        _prune(tiny_model_dir, tmp_path / "out", "--drop", "2", "--metric", "cosine")
    assert exit_info.value.code == 2 and "invalid choice: 'cosine'" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\nprune: {{n_layers: 2, metric: cosine}}\noutput: {tmp_path / 'out'}\n")
    _assert_clean_failure(capsys, main(["run", str(recipe)]), tmp_path / "out", "unknown metric 'cosine'")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metrics", "perplexity"], "sweep metric 'perplexity' is not one of angular_last"),
        (["--fractions", "0.2,1.5"], "in (0, 1), got 1.5"),
    ],
)
def test_sweep_refuses_what_it_cannot_measure_before_loading(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    _assert_clean_failure(capsys, main(["sweep", str(tmp_path / "no-such-model"), "--out", str(out), *args]), out, message)


def test_bad_models(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _assert_clean_failure(capsys, _prune(tmp_path / "nope", out, "--drop", "1"), out, "does not exist")

    no_config = tmp_path / "empty"
    no_config.mkdir()
    _assert_clean_failure(capsys, _prune(no_config, out, "--drop", "1"), out, "has no config.json")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "config.json").write_text("{not json")
    _assert_clean_failure(capsys, _prune(corrupt, out, "--drop", "1"), out, "cannot read the model config")

    bad_weights = tmp_path / "bad-weights"
    shutil.copytree(tiny_model_dir, bad_weights)
    (bad_weights / "model.safetensors").write_bytes(b"\x00" * 64)
    _assert_clean_failure(capsys, _prune(bad_weights, out, "--drop", "1"), out, "cannot load the model")

    pickle_only = tmp_path / "pickle"
    shutil.copytree(tiny_model_dir, pickle_only)
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")
    _assert_clean_failure(capsys, _prune(pickle_only, out, "--drop", "1"), out, "safetensors only")

    vision = tmp_path / "vit"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    (vision / "model.safetensors").write_bytes(b"")
    _assert_clean_failure(capsys, _prune(vision, out, "--drop", "1"), out, "not a causal language model")

    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

    diff = tmp_path / "diffllama"  # each layer's lambda_init follows its layer index, which a cut would change
    DiffLlamaForCausalLM(DiffLlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=3, vocab_size=300,
                                         bos_token_id=1, eos_token_id=2)).save_pretrained(diff)
    tiny_tokenizer().save_pretrained(diff)
    _assert_clean_failure(capsys, _prune(diff, out, "--layers", "1"), out, "cannot keep layer 2 as layer 1")


def test_empty_calibration_and_output_over_source(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    out = tmp_path / "out"
    _assert_clean_failure(capsys, _prune(tiny_model_dir, out, "--drop", "1", "--calibration", str(empty)), out, "empty")
    before = folder_digest(tiny_model_dir)
    rc = _prune(tiny_model_dir, tiny_model_dir, "--drop", "1", "--overwrite")
    assert rc == 2 and "is the source model's folder" in capsys.readouterr().err
    assert folder_digest(tiny_model_dir) == before


def test_scan_command_writes_json_and_plot(tiny_model_dir, tmp_path, capsys):
    rc = main(["scan", str(tiny_model_dir), "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"), *FAST])
    assert rc == 0
    assert "angular_last: drop" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["num_layers"] == 6
    assert main(["scan", str(tiny_model_dir), "--out", str(tmp_path / "s.json"), *FAST]) == 2


def test_console_script_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hubprune.cli", "prune", str(tmp_path / "missing"), "--drop", "2", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"hubprune: error: {tmp_path / 'missing'} does not exist; give an existing folder, a .gguf file or a Hub id (org/name)"]


def test_no_output_folder_may_lie_inside_or_contain_the_source(tiny_model_dir, tmp_path, capsys):
    nest = tmp_path / "nest"
    shutil.copytree(tiny_model_dir, nest / "model")
    (nest / "notes.txt").write_text("mine")
    before = folder_digest(nest)
    for out, message in ((nest / "model" / "pruned", "lies inside the source"), (nest, "contains the source")):
        for command in (["prune", str(nest / "model"), "--out", str(out), "--drop", "1", *FAST, "--overwrite"],
                        ["cut", str(nest / "model"), "--layers", "1", "--out", str(out), "-q", "--overwrite"]):
            assert main(command) == 2
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, err
            assert folder_digest(nest) == before


def test_overwrite_replaces_only_what_hubprune_wrote(tiny_model_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert _prune(tiny_model_dir, mine, "--drop", "1", "--overwrite") == 2
    assert "not written by hubprune" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _prune(tiny_model_dir, empty, "--drop", "1", "--overwrite") == 0  # an empty folder holds nothing to lose


def test_a_run_removes_the_temporary_folders_a_killed_run_left(tiny_model_dir, tmp_path):
    import os

    dead = tmp_path / ".o.tmp-999999999-abcd"  # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".o.tmp-{os.getpid()}-efgh"  # a run still going (this process)
    alive.mkdir()
    user = tmp_path / ".o.tmp-notes"  # not of hubprune's naming: never touched
    user.mkdir()
    assert _prune(tiny_model_dir, tmp_path / "o", "--drop", "1") == 0
    assert not dead.exists() and alive.is_dir() and user.is_dir()


def test_python_dash_m_hubprune_is_the_cli():
    import subprocess
    import sys

    from hubprune import __version__

    out = subprocess.run([sys.executable, "-m", "hubprune", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
