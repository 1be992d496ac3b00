"""Recipes and configs validate themselves and say what would be right."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubprune.config import CalibrationConfig, PruneConfig, Recipe


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_layers": 0}, "positive integer"),
        ({"n_layers": -2}, "positive integer"),
        ({"fraction": 0.0}, "strictly between 0 and 1"),
        ({"fraction": 1.0}, "strictly between 0 and 1"),
        ({"fraction": 1.5}, "strictly between 0 and 1"),
        ({"layers": [3, 4, 3]}, "layer 3 more than once"),
        ({"layers": [-1]}, "0-based and non-negative"),
        ({"layers": []}, "at least one"),
        ({"n_layers": 2, "fraction": 0.1}, "exactly one"),
        ({}, "exactly one"),
        ({"n_layers": 2, "metric": "cosine"}, "unknown metric 'cosine'"),
    ],
)
def test_prune_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**kwargs)


def test_prune_config_counts_against_the_model():
    assert PruneConfig(fraction=0.2).count(30) == 6
    assert PruneConfig(layers=[1, 5]).count(30) == 2
    with pytest.raises(ValueError, match="cannot drop 30 of 30 layers"):
        PruneConfig(n_layers=30).count(30)
    with pytest.raises(ValueError, match="rounds to 0 layers"):
        PruneConfig(fraction=0.01).count(30)


def test_calibration_config_rejects():
    with pytest.raises(ValueError, match="only one of texts, files or dataset"):
        CalibrationConfig(texts=["a"], files=["b.txt"])
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        CalibrationConfig(n_samples=0)
    with pytest.raises(TypeError, match="lists of strings"):
        CalibrationConfig(files="notes.txt")


RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate_and_name_their_output_after_the_file(path):
    """Each recipe in recipes/ loads, checks itself, and writes to out/<its name> (dev.py demo relies on it)."""
    recipe = Recipe.load(path)
    assert recipe.output == f"out/{path.stem}"
    kept = int(path.stem.rpartition("-")[2].removesuffix("l"))  # smollm2-24l: 24 of SmolLM2's 30 layers kept
    assert 30 - recipe.prune.count(30) == kept


def test_recipe_yaml_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: org/name\nprune:\n  fraction: 0.25\n  metric: angular_all\ncalibration:\n  n_samples: 8\n")
    recipe = Recipe.load(path)
    assert recipe.prune.fraction == 0.25 and recipe.calibration.n_samples == 8
    recipe.save(tmp_path / "again.yaml")
    assert Recipe.load(tmp_path / "again.yaml") == recipe


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: a/b\nprune: {n_layers: 2}\nlearning_rate: 3\n", "unknown key 'learning_rate'; known keys are"),
        ("model: a/b\nprune: {n_layers: 2, drop: 3}\n", r"recipe.prune: unknown key 'drop'"),
        ("prune: {n_layers: 2}\n", "missing required key 'model'"),
        ("model: a/b\nprune: {n_layers: 2}\ndtype: float8\n", "unknown dtype 'float8'"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_recipe_rejects(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        Recipe.load(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")
