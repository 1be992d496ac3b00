"""Sweep and quality budget on a tiny model, with held-out perplexity as the quality measure."""

from __future__ import annotations

import csv
import json

import pytest

from hubprune import LayerPruner
from hubprune.config import HealConfig
from hubprune.eval.perplexity import heldout_windows, perplexity
from hubprune.methods.sweep import largest_drop_within, sweep


@pytest.fixture(scope="module")
def pruner(tiny_model_dir):
    p = LayerPruner.from_pretrained(tiny_model_dir, device="cpu")
    p.scan(n_samples=4, seq_len=32, progress=False)
    return p


def test_sweep_writes_json_csv_and_plot(pruner, tmp_path):
    heal = HealConfig(steps=2, batch_size=2, seq_len=32, warmup_steps=0)
    result = sweep(pruner, fractions=(0.2, 0.4), metrics=("angular_last", "block_influence"), heal=heal, progress=False)
    assert len(result.points) == 2 * 2 * 2
    assert {(p.metric, p.n_layers, p.healed) for p in result.points} == {
        (m, n, h) for m in ("angular_last", "block_influence") for n in (1, 2) for h in (False, True)}
    files = result.save(tmp_path)
    rows = list(csv.DictReader(files["sweep.csv"].open()))
    assert len(rows) == 8 and all(float(r["quality"]) > 0 for r in rows)
    assert json.loads(files["sweep.json"].read_text())["original"]["perplexity"] > 1
    assert files["sweep.png"].read_bytes()[:4] == b"\x89PNG"


def test_budget_is_measured(pruner):
    n, points = largest_drop_within(pruner, 0.5, progress=False)
    windows = heldout_windows(pruner.tokenizer, n_samples=16)
    base = perplexity(pruner.model, windows.ids)
    kept = pruner.prune(n_layers=n)
    assert base / perplexity(kept.model, windows.ids) >= 0.5  # measured again, independently
    assert all(p.quality < 0.5 for p in points if p.n_layers > n)
    assert any(p.n_layers == n for p in points)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        largest_drop_within(pruner, 1.5)


def test_prune_with_a_quality_budget_from_the_cli(tiny_model_dir, tmp_path, capsys):
    from hubprune.cli import main

    rc = main(["prune", str(tiny_model_dir), "--max-quality-loss", "0.6", "--out", str(tmp_path / "b"), "-q",
               "--n-samples", "2", "--seq-len", "16"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "b" / "hubprune.json").read_text())
    budget = record["scores"]["budget"]
    assert budget["chosen"] == len(record["removed_layers"]) and budget["measured"]


def test_chat_quality_is_top1_agreement_with_the_originals_answers(pruner, monkeypatch):
    from hubprune.methods import sweep as sweep_module

    monkeypatch.setattr(sweep_module, "CHAT_PROMPTS", 4)  # a tiny model: 4 prompts of up to 64 tokens
    result = sweep(pruner, fractions=(0.2,), metrics=("angular_last",), quality="chat", progress=False)
    (point,) = result.points
    assert 0 <= point.quality < 1  # a random model without one layer is no longer the original
    n, points = largest_drop_within(pruner, 0.99, quality="chat", progress=False)
    assert n >= 1 and all(0 <= p.quality <= 1 for p in points)
