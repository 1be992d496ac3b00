"""The card is rendered from the folder's record, so it must say exactly what the record says."""

from __future__ import annotations

import re

import pytest
from huggingface_hub import ModelCard

from hubprune.card import base_name, layer_map, readme_was_edited, render_card, write_card
from hubprune.record import PruneRecord


@pytest.fixture(scope="module")
def smollm2_folder(smollm2, tmp_path_factory):
    smollm2.scan(n_samples=8, progress=False)
    return smollm2.prune(n_layers=6).save_pretrained(tmp_path_factory.mktemp("card") / "smollm2-24l")


@pytest.mark.slow
def test_card_matches_the_record_of_real_smollm2(smollm2_folder):
    record = PruneRecord.load(smollm2_folder)
    text = (smollm2_folder / "README.md").read_text()
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["license"] == "apache-2.0"  # carried verbatim from the base (here: the GGUF's metadata)
    assert data["language"] == ["en"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"hubprune", "pruned", "depth-pruning"} <= set(data["tags"])
    assert data["datasets"] == ["wikimedia/wikipedia"]
    assert "model-index" not in data  # no evaluation yet: no eval section, no empty table

    assert f"Removed: `{record.removed_layers}`" in text
    marks = re.search(r"^layer  ([.x]+)$", text, re.M).group(1)
    assert [i for i, m in enumerate(marks) if m == "x"] == record.removed_layers and len(marks) == 30
    assert "with 6 of its 30 decoder layers removed" in text
    assert f"{record.parameters_before / 1e6:.1f}M" in text and f"{record.parameters_after / 1e6:.1f}M" in text
    assert "| parameters | 134.5M | 113.3M | -15.8% |" in text
    assert "![" in text and "(hubprune_scan.png)" in text
    assert "```yaml\nmodel: HuggingFaceTB/SmolLM2-135M-Instruct" in text
    assert "hubprune run hubprune_recipe.yaml" in text
    assert "vllm serve smollm2-24l" in text
    assert "## Quality before and after" not in text and "## Healing" not in text
    assert "None" not in text and "| |  |" not in text and "nan" not in text
    assert not readme_was_edited(smollm2_folder)


def test_card_with_evaluation_and_healing(tiny_model_dir, tmp_path):
    from hubprune import LayerPruner

    pruned = LayerPruner.from_pretrained(tiny_model_dir, device="cpu").prune(layers=[1, 2])
    folder = pruned.save_pretrained(tmp_path / "tiny")
    record = PruneRecord.load(folder)
    record.evaluation = {
        "original": {"perplexity": 20.0, "tasks": {"arc_easy": {"acc_norm": 0.5, "chance": 0.25}}},
        "pruned": {"perplexity": 24.0, "tasks": {"arc_easy": {"acc_norm": 0.45, "chance": 0.25}}},
        "heldout": "16 x 256 tokens of held-out Wikipedia", "command": "hubprune eval tiny",
        "chat": {"mode": "chat", "prompts": 128, "source": "80 MT-bench first turns and 48 Natural Questions",
                 "max_new_tokens": 128, "answer_tokens": 13359, "top1_agreement": 0.706, "kl": 0.519,
                 "loop_rate": 0.68, "eos_rate": 0.258, "original_loop_rate": 0.352, "original_eos_rate": 0.344},
    }
    record.healing = {"method": "lora+distill", "steps": 10, "tokens": 10240, "seconds": 12.0, "tokens_per_second": 853.0,
                      "first_loss": 3.0, "final_loss": 2.5, "data": {"source": "wiki corpus (train split)"},
                      "config": {"method": "lora", "lora_r": 8, "lora_alpha": 16, "learning_rate": 2e-4,
                                 "warmup_steps": 10, "batch_size": 4, "seq_len": 256, "grad_accum": 1, "distill": 0.5},
                      "refit": {"tokens": 32768, "seconds": 3.0, "ridge": 1e-3, "gaps": [
                          {"removed": [1, 3], "refit_layer": 0, "original_layer": 0, "module": "mlp.down_proj",
                           "relative_error_before": 0.9, "relative_error_after": 0.3}]}}
    record.save(folder)
    text = str(render_card(folder, "alice/tiny"))
    card = ModelCard(text)
    results = {(r.dataset_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results[("arc_easy", "acc_norm")] == 0.45
    assert results[("arc_easy", f"acc_norm of the original {base_name(record)}")] == 0.5
    assert results[("heldout", "perplexity")] == 24.0
    assert card.data.model_name == "alice/tiny"
    assert "| arc_easy acc_norm | 0.5000 | 0.4500 | 80% above chance |" in text
    assert "keeps 80% of the original's accuracy above chance" in text
    assert "| held-out perplexity (lower is better) | 20.00 | 24.00 | x1.20 |" in text
    assert "| chat answers: top-1 agreement with the original | 1 | 0.706 | 71% |" in text
    assert "| chat answers that loop (a word 4-gram 3+ times) | 35% | 68% |  |" in text
    assert "the original answered 80 MT-bench first turns and 48 Natural Questions greedily" in text
    table = text[text.index("## Quality before and after"):text.index("## Size")]
    assert {line.count("|") for line in table.splitlines() if line.startswith("|")} == {5}  # no stray pipes
    assert "## Healing" in text and "LoRA with distillation from the original (KL weight 0.5" in text
    assert ("layer 0 mlp.down_proj refit by least squares for the removed [1, 3) (32,768 tokens; fit error 0.90 -> "
            "0.30)") in text
    assert "It was not healed" not in text
    assert "base_model" not in card.data.to_dict()  # a local folder is no Hub id: not claimed as base_model
    record.healing["config"]["divergence"] = "reverse"
    record.save(folder)
    assert "distillation from the original (reverse KL weight 0.5" in str(render_card(folder, "alice/tiny"))


def test_edited_readme_is_detected(tiny_model_dir, tmp_path):
    from hubprune import LayerPruner

    folder = LayerPruner.from_pretrained(tiny_model_dir, device="cpu").prune(layers=[0]).save_pretrained(tmp_path / "t")
    assert not readme_was_edited(folder)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nMy own notes.\n")
    assert readme_was_edited(folder)
    write_card(folder)
    assert not readme_was_edited(folder)


def test_layer_map():
    assert layer_map([2, 3], 12).splitlines() == ["tens   0         1 ", "units  012345678901", "layer  ..xx........"]


def test_a_card_of_a_local_folder_names_the_folder_not_this_machines_path(tiny_model_dir, tmp_path):
    from hubprune.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dir), "--layers", "2", "--out", str(out), "-q"]) == 0
    text = (out / "README.md").read_text()
    assert str(tiny_model_dir.resolve().parent) not in text and str(tmp_path) not in text
    assert tiny_model_dir.name in text
