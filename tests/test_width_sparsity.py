"""MLP width and weight sparsity beside layer removal: exact surgery, plain checkpoints, masks that
survive healing, refusals (one line, nothing written, before loading where possible), the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import folder_digest, tiny_gpt2, tiny_llama, zeros_per_group

from hubprune import LayerPruner, PrunedModel
from hubprune.cli import main
from hubprune.config import CalibrationConfig, HealConfig, PruneConfig, parse_sparsity
from hubprune.methods.sparsity import masks_from_zeros, target_modules

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--n-samples", "2", "--seq-len", "16", "-q"]
HEAL = dict(steps=3, batch_size=1, seq_len=16, learning_rate=1e-2, warmup_steps=0, refit=False, text="prose")
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _pruner(folder) -> LayerPruner:
    pruner = LayerPruner.from_pretrained(folder, device="cpu")
    pruner.calibrate(CalibrationConfig(n_samples=2, seq_len=16))
    return pruner


def test_width_cut_of_dead_neurons_keeps_the_logits_exactly(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:  # neurons 16.. add nothing: zero down_proj columns
            layer.mlp.down_proj.weight[:, 16:] = 0
    folder = _save(model, tokenizer, tmp_path / "dead")
    pruner = _pruner(folder)
    pruned = pruner.prune(mlp_width=0.25, progress=False)
    assert pruned.model.config.intermediate_size == 16
    assert all(layer.mlp.up_proj.out_features == 16 for layer in pruned.model.model.layers)
    torch.testing.assert_close(pruned.model(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(pruner.model(IDS).logits, model(IDS).logits, rtol=0, atol=0)  # original untouched

    out = pruned.save_pretrained(tmp_path / "narrow")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.intermediate_size == 16
    torch.testing.assert_close(reloaded(IDS).logits, pruned.model(IDS).logits, rtol=0, atol=0)
    record = json.loads((out / "hubprune.json").read_text())
    assert record["width"]["intermediate_size_after"] == 16 and record["removed_layers"] == []
    assert record["config_updates"] == ["intermediate_size"]
    assert record["parameters_after"] == sum(p.numel() for p in reloaded.parameters())
    card = (out / "README.md").read_text()
    assert "## Width and sparsity" in card and "## Which layers were removed" not in card
    assert "every MLP narrowed from 64 to 16 neurons" in card


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_unstructured_sparsity_is_exact_and_leaves_embeddings_dense(tiny_model_dir, method):
    pruner = _pruner(tiny_model_dir)
    pruned = pruner.prune(sparsity=0.5, sparsity_method=method, progress=False)
    for name, module in target_modules(pruned.model).items():
        assert (module.weight == 0).sum().item() == module.weight.numel() // 2, name
        if method == "wanda":  # per output row
            assert ((module.weight == 0).sum(1) == module.weight.shape[1] // 2).all()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(pruned.model.get_parameter(name), pruner.model.get_parameter(name)), name
    assert all((m.weight != 0).all() for m in target_modules(pruner.model).values())  # the original is dense
    assert pruned.record.sparsity["sparsity"] == 0.5 and pruned.record.sparsity["method"] == method


def test_two_four_sparsity_zeroes_two_of_every_four(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pruned = _pruner(tiny_model_dir).prune(2, mlp_width=0.75, sparsity="2:4", progress=False)
    for module in target_modules(pruned.model).values():
        assert (zeros_per_group(module.weight) >= 2).all()
    out = pruned.save_pretrained(tmp_path / "sparse")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(reloaded(IDS).logits, pruned.model(IDS).logits, rtol=0, atol=0)
    assert reloaded.config.num_hidden_layers == 4 and reloaded.config.intermediate_size == 48
    record = json.loads((out / "hubprune.json").read_text())
    assert record["sparsity"]["pattern"] == "2:4" and record["sparsity"]["format"].startswith("dense")
    assert set(record["sparsity"]["projections"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "sparsity: '2:4'" in (out / "hubprune_recipe.yaml").read_text()
    card = (out / "README.md").read_text()
    assert "2:4-sparsity" in card and "saved dense because current vLLM has no 2:4 sparse kernels" in card


def test_healing_keeps_the_mask_in_memory_and_from_a_saved_folder(tiny_model_dir, tmp_path):
    pruned = _pruner(tiny_model_dir).prune(sparsity="2:4", progress=False)
    masks = masks_from_zeros(pruned.model)
    healed = pruned.heal(HealConfig(**HEAL), progress=False)
    assert healed.record.healing["masked"] == len(masks)
    changed = 0
    for name, module in target_modules(healed.model).items():
        assert (module.weight[~masks[name]] == 0).all(), name
        changed += int((module.weight != target_modules(pruned.model)[name].weight).sum())
    assert changed  # healing did change the kept weights

    folder = pruned.save_pretrained(tmp_path / "sparse")
    again = PrunedModel.from_pretrained(folder, device="cpu").heal(HealConfig(**HEAL), progress=False)
    for name, module in target_modules(again.model).items():
        assert (module.weight[~masks[name]] == 0).all(), name


def test_the_file_level_merge_keeps_a_sparse_checkpoints_zeros(tiny_model_dir, tmp_path):
    from conftest import checkpoint_tensors
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from hubprune.heal.merge import merge_adapter_into_checkpoint

    pruned = _pruner(tiny_model_dir).prune(sparsity=0.5, sparsity_method="magnitude", progress=False)
    folder = pruned.save_pretrained(tmp_path / "sparse")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(PrunedModel.from_pretrained(folder, device="cpu").model, config)
    merge_adapter_into_checkpoint(
        folder, get_peft_model_state_dict(peft_model), tmp_path / "merged", lora_config=config, progress=False
    )
    before, after = checkpoint_tensors(folder), checkpoint_tensors(tmp_path / "merged")
    for name in before:
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            assert torch.equal(after[name] == 0, before[name] == 0), name
            assert not torch.equal(after[name], before[name])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "strictly between 0 and 1"),
        (1.0, "strictly between 0 and 1"),
        ("1.5", "strictly between 0 and 1"),
        (124, "quote an N:M pattern"),  # YAML 1.1 reads a bare 2:4 as 124
        ("4:2", "0 < N < M"),
        ("2:2", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("2-4", "or N:M such as 2:4"),
        (True, "fraction such as 0.5"),
    ],
)
def test_bad_sparsity_values(value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_sparsity(value)
    with pytest.raises((ValueError, TypeError), match=f"prune.*{message}"):
        PruneConfig(sparsity=value)


def test_parse_sparsity():
    assert parse_sparsity("2:4").fraction == 0.5 and parse_sparsity("2:4").pattern == "2:4"
    assert parse_sparsity("0.3").fraction == 0.3 and parse_sparsity(0.3).pattern == "unstructured"
    assert PruneConfig(sparsity="0.5").sparsity == 0.5 and PruneConfig(sparsity=" 1:4").sparsity == "1:4"


def _assert_clean_failure(capsys, rc, out: Path, message: str):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("hubprune: error: "), err
    assert message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mlp-width", "0"], "strictly between 0 and 1"),
        (["--mlp-width", "1"], "strictly between 0 and 1"),
        (["--mlp-width", "-0.2"], "strictly between 0 and 1"),
        (["--sparsity", "0"], "strictly between 0 and 1"),
        (["--sparsity", "1"], "strictly between 0 and 1"),
        (["--sparsity", "4:2"], "0 < N < M"),
        (["--sparsity", "half"], "N:M such as 2:4"),
        (["--drop", "2", "--sparsity", "3:3"], "0 < N < M"),
        (["--max-quality-loss", "0.05", "--sparsity", "0.5"], "cannot be combined"),
        ([], "give exactly one of"),
    ],
)
def test_bad_width_and_sparsity_options_refused_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(LayerPruner, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    _assert_clean_failure(capsys, main(["prune", str(tiny_model_dir), "--out", str(out), *FAST, *args]), out, message)


def _moe_folder(tmp_path, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=300, max_position_embeddings=64,
    )
    return _save(AutoModelForCausalLM.from_config(config), tokenizer, tmp_path / "moe")


def test_families_whose_mlp_cannot_be_narrowed_are_refused_before_loading(tmp_path, tokenizer, capsys, monkeypatch):
    gpt2 = _save(tiny_gpt2(num_layers=2), tokenizer, tmp_path / "gpt2")
    moe = _moe_folder(tmp_path, tokenizer)
    monkeypatch.setattr(LayerPruner, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    for folder, message in ((gpt2, "no single integer intermediate_size"), (moe, "mixture-of-experts (num_experts=4)")):
        before, out = folder_digest(folder), tmp_path / "out"
        rc = main(["prune", str(folder), "--mlp-width", "0.5", "--out", str(out), *FAST])
        _assert_clean_failure(capsys, rc, out, message)
        assert folder_digest(folder) == before


def test_gpt2_conv1d_projections_can_be_sparsified(tmp_path, tokenizer):
    folder = _save(tiny_gpt2(num_layers=2), tokenizer, tmp_path / "gpt2")
    pruned = _pruner(folder).prune(sparsity="2:4", progress=False)
    for module in target_modules(pruned.model).values():
        assert (zeros_per_group(module.weight.t()) == 2).all()  # Conv1D stores [in, out]


def test_cli_end_to_end_prune_then_heal(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    args = ["--drop", "1", "--mlp-width", "0.5", "--sparsity", "2:4", "--sparsity-method", "wanda"]
    assert main(["prune", str(tiny_model_dir), "--out", str(out), *FAST, *args]) == 0
    printed = capsys.readouterr().out
    assert "MLP width 64 -> 32" in printed and "2:4 sparsity (wanda, 50.0% of decoder weights zero)" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5 and model.config.intermediate_size == 32
    # The compare app and the server say it, beside the layer map.
    from hubprune.server.launch import _info
    from hubprune.space.backends import InProcessBackend, reshaped_text
    from hubprune.space.figures import layer_map_html

    info = InProcessBackend(out, name="pruned", device="cpu").info()
    assert info.reshaped == "MLP width 64 → 32 · 2:4 sparse (wanda)"
    assert "removed layer" in layer_map_html(vars(info)) and "2:4 sparse (wanda)" in layer_map_html(vars(info))
    served = _info({"pruned": str(out)})["pruned"]
    assert reshaped_text(served) == info.reshaped
    masks = masks_from_zeros(model)
    assert all((~m).sum() * 2 == m.numel() for m in masks.values())

    healed = tmp_path / "healed"
    heal = ["--steps", "2", "--batch-size", "1", "--seq-len", "16", "--no-refit", "--text", "prose", "-q"]
    assert main(["heal", str(out), "--out", str(healed), *heal]) == 0
    after = AutoModelForCausalLM.from_pretrained(healed)
    for name, module in target_modules(after).items():
        assert (module.weight[~masks[name]] == 0).all(), name
    record = json.loads((healed / "hubprune.json").read_text())
    assert record["sparsity"]["pattern"] == "2:4" and record["healing"]["masked"] == len(masks)
    assert main(["run", str(out / "hubprune_recipe.yaml"), "--out", str(tmp_path / "again"), "-q"]) == 0
    again = json.loads((tmp_path / "again" / "hubprune.json").read_text())
    assert again["sparsity"]["mask_sha256"] == json.loads((out / "hubprune.json").read_text())["sparsity"]["mask_sha256"]


def _input_norms(model, modules: dict, ids: torch.Tensor) -> dict:
    """||X_:j|| of each module's inputs in one whole-model pass over ``ids``."""
    squares = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: squares.__setitem__(
        n, squares.get(n, 0) + (args[0].flatten(0, -2).double() ** 2).sum(0))) for n, m in modules.items()]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: s.sqrt().float() for n, s in squares.items()}


def _wanda_by_whole_passes(model, target, ids, sequential: bool) -> dict:
    """The oracle: one whole-model pass per layer, the layers before it already sparse (``sequential``),
    or every layer scored on the dense model's inputs."""
    from hubprune.architecture.families import decoder_layers
    from hubprune.methods.sparsity import _rows, apply_masks, keep_mask

    modules = target_modules(model)
    norms = _input_norms(model, modules, ids)
    for index in range(len(decoder_layers(model))):
        own = {n: m for n, m in modules.items() if f"layers.{index}." in n}
        if sequential:
            norms = _input_norms(model, own, ids)
        apply_masks(model, {n: keep_mask(_rows(m).abs() * norms[n], target, per_row=True) for n, m in own.items()})
    return masks_from_zeros(model)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_wanda_scores_each_layer_on_the_outputs_of_the_sparse_layers_before_it(family):
    """Layer by layer equals one whole-model pass per layer (layers before it already sparse), and
    differs from scoring every layer on the dense model's inputs. Gemma 3's sliding-window layers
    get their own attention mask when run one at a time."""
    import copy

    from arch_coverage import build

    from hubprune.calibration import TokenWindows
    from hubprune.methods.sparsity import sparsify

    if family == "llama":
        model = tiny_llama(num_layers=4, seed=3)
    else:
        config, model, _ = build("gemma3_text")
        config.sliding_window = 4  # narrower than the windows, so the layer types' masks differ
        model = type(model)(config).eval()
    torch.manual_seed(0)
    windows = TokenWindows(torch.randint(3, 100, (3, 16)), [], "random tokens")
    target = parse_sparsity(0.5)
    expected = _wanda_by_whole_passes(copy.deepcopy(model), target, windows.ids, sequential=True)
    one_pass = _wanda_by_whole_passes(copy.deepcopy(model), target, windows.ids, sequential=False)
    sparsify(model, target, "wanda", windows, batch_size=2, progress=False)
    got = masks_from_zeros(model)
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.equal(got[name], expected[name]), name
    assert any(not torch.equal(one_pass[n], got[n]) for n in got)  # the sequential pass changes some masks
