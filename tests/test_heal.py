"""Healing on a tiny model: merged plain checkpoint, untouched sources, exact resume, refusals, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from hubprune import LayerPruner
from hubprune.config import HealConfig
from hubprune.heal.lora import CHECKPOINT_FILE

FAST = dict(steps=6, batch_size=2, seq_len=32, learning_rate=1e-2, warmup_steps=0, checkpoint_every=3)


@pytest.fixture()
def pruned(tiny_model_dir):
    pruner = LayerPruner.from_pretrained(tiny_model_dir, device="cpu")
    return pruner.prune(layers=[2, 3])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_heal_returns_a_merged_copy_and_leaves_sources_alone(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    base, before = _state(pruned.base), _state(pruned.model)
    healed = pruned.heal(HealConfig(**FAST, distill=0.5), progress=False)
    for k, v in _state(pruned.base).items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    for k, v in _state(pruned.model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    changed = [k for k, v in _state(healed.model).items() if not torch.equal(v, before[k])]
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) for k in changed)
    assert not any("lora" in k for k in healed.model.state_dict())
    report = healed.record.healing
    assert report["steps"] == 6 and report["tokens"] == 6 * 2 * 32 and report["method"] == "lora+distill"
    assert report["data"]["source"] == "wiki corpus (train split)"
    out = healed.save_pretrained(tmp_path / "healed")
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(reloaded(ids).logits, healed.model(ids).logits)
    assert json.loads((out / "hubprune.json").read_text())["healing"]["steps"] == 6


def test_rerun_resumes_from_the_checkpoint_exactly(pruned, tmp_path):
    config = HealConfig(**FAST)
    first = pruned.heal(config, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_FILE).is_file()  # written at step 3 of 6
    second = pruned.heal(config, checkpoint_dir=tmp_path, progress=False)
    assert second.record.healing["resumed_from"] == 3
    for k, v in _state(second.model).items():
        torch.testing.assert_close(v, first.model.state_dict()[k])
    with pytest.raises(ValueError, match="different heal config"):
        pruned.heal(HealConfig(**{**FAST, "learning_rate": 5e-3}), checkpoint_dir=tmp_path, progress=False)


def test_refusals(pruned, monkeypatch):
    from hubprune.calibration import default_corpus

    train = default_corpus("wiki", "train")
    with pytest.raises(ValueError, match="overlap in 1 document"):
        pruned.heal(HealConfig(**FAST), eval_texts=["an unrelated text", train[0]], progress=False)
    orphan = type(pruned)(pruned.model, pruned.tokenizer, pruned.record, pruned.recipe)
    with pytest.raises(ValueError, match="needs the original model as teacher"):
        orphan.heal(HealConfig(**FAST, distill=0.5), progress=False)
    with pytest.raises(ValueError, match="heal.distill is a loss weight in"):
        HealConfig(distill=1.5)
    import importlib.util

    import hubprune.heal.fourbit as fourbit

    find_spec = importlib.util.find_spec
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
        with pytest.raises(ValueError, match="qlora needs the bitsandbytes package.*use method: lora"):
            fourbit.require_qlora()
    monkeypatch.setattr(fourbit, "_nf4_on_cpu", lambda: False)  # a bitsandbytes build without CPU kernels
    if importlib.util.find_spec("bitsandbytes") is not None and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="qlora needs a CUDA GPU here.*use method: lora on a CPU"):
            pruned.heal(HealConfig(**FAST, method="qlora"), progress=False)


def test_cli_heal_with_distillation_and_adapter(tiny_model_dir, tmp_path, capsys):
    from hubprune.cli import main

    assert main(["prune", str(tiny_model_dir), "--layers", "1,2", "--out", str(tmp_path / "p"), "-q",
                 "--n-samples", "2", "--seq-len", "16"]) == 0
    rc = main(["heal", str(tmp_path / "p"), "--out", str(tmp_path / "h"), "--steps", "4", "--batch-size", "2",
               "--seq-len", "32", "--distill", "0.5", "--lora-r", "4", "--lora-alpha", "12", "--keep-adapter", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert "healed 4 steps (lora+distill)" in capsys.readouterr().out
    assert (tmp_path / "h" / "adapter" / "adapter_config.json").is_file()
    record = json.loads((tmp_path / "h" / "hubprune.json").read_text())
    assert record["removed_layers"] == [1, 2] and record["healing"]["steps"] == 4
    assert (record["healing"]["config"]["lora_r"], record["healing"]["config"]["lora_alpha"]) == (4, 12)
    assert not list(tmp_path.glob(".h.heal-checkpoints"))
    assert main(["heal", str(tmp_path / "p"), "--out", str(tmp_path / "h"), "--steps", "4", "-q"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_equal_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    """accelerate launch --multi_gpu on a CPU machine: 2 gloo processes x batch 2 == 1 process x batch 4."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from hubprune.cli import main

    assert main(["prune", str(tiny_model_dir), "--layers", "1,2", "--out", str(tmp_path / "p"), "-q",
                 "--n-samples", "2", "--seq-len", "16"]) == 0
    heal = ["heal", str(tmp_path / "p"), "--steps", "3", "--seq-len", "32", "--lr", "0.01", "-q", "--precision", "float32"]
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hubprune.cli", *heal,
                             "--batch-size", "2", "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert main([*heal, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / d / "hubprune.json").read_text())["healing"] for d in ("two", "one"))
    assert two["tokens"] == one["tokens"] == 3 * 4 * 32
    assert two["data"]["fingerprint"] == one["data"]["fingerprint"]
    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_heals_close_to_float32_and_says_so(pruned, monkeypatch):
    import hubprune.heal.lora as lora

    monkeypatch.setattr(lora, "native_bfloat16", lambda device: False)
    exact = pruned.heal(HealConfig(**FAST, distill=0.5), progress=False)
    assert exact.record.healing["precision"] == "float32"  # auto on a CPU without native bfloat16
    fast = pruned.heal(HealConfig(**FAST, distill=0.5, precision="bfloat16"), progress=False)
    assert fast.record.healing["precision"] == "bfloat16"
    assert abs(fast.record.healing["final_loss"] - exact.record.healing["final_loss"]) < 0.05 * exact.record.healing["final_loss"]
    assert all(p.dtype == torch.float32 for p in fast.model.parameters())  # autocast, not a bfloat16 copy
    monkeypatch.setattr(lora, "native_bfloat16", lambda device: True)
    assert pruned.heal(HealConfig(**FAST), progress=False).record.healing["precision"] == "bfloat16"


def test_native_bfloat16_reads_the_cpu_flags(monkeypatch, tmp_path):
    import hubprune.loading as loading

    real = loading.Path
    for flags, expected in (("fpu avx2 fma", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(loading, "Path", lambda p, _f=tmp_path / "cpuinfo": _f if p == "/proc/cpuinfo" else real(p))
        assert loading.native_bfloat16(torch.device("cpu")) is expected
    assert loading.native_bfloat16(torch.device("meta")) is False


def test_recipe_with_healing(tiny_model_dir, tmp_path):
    from hubprune.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\ncalibration: {{n_samples: 2, seq_len: 16}}\n"
                      "prune: {n_layers: 2}\nheal: {steps: 3, batch_size: 2, seq_len: 32, distill: 1.0}\n"
                      f"output: {tmp_path / 'out'}\n")
    assert main(["run", str(recipe), "-q"]) == 0
    record = json.loads((tmp_path / "out" / "hubprune.json").read_text())
    assert record["healing"]["steps"] == 3 and record["healing"]["method"] == "lora+distill"
    assert "heal:" in (tmp_path / "out" / "hubprune_recipe.yaml").read_text()
    assert "## Healing" in (tmp_path / "out" / "README.md").read_text()
    assert not list(tmp_path.glob(".out.heal-checkpoints"))


def test_heal_refits_the_layer_before_the_gap_first_and_records_it(pruned):
    """The default heal repairs the gap [2, 4) by refitting kept layer 1's down_proj before LoRA (hubprune.heal.refit)."""
    refit_only = pruned.heal(HealConfig(**{**FAST, "steps": 1, "learning_rate": 1e-9}), progress=False)
    gaps = refit_only.record.healing["refit"]["gaps"]
    assert [(g["removed"], g["refit_layer"], g["module"]) for g in gaps] == [([2, 4], 1, "mlp.down_proj")]
    assert gaps[0]["relative_error_after"] < gaps[0]["relative_error_before"]
    down = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(refit_only.model.state_dict()[down], pruned.model.state_dict()[down])
    assert torch.equal(pruned.model.state_dict()[down], pruned.base.state_dict()[down])  # sources untouched

    plain = pruned.heal(HealConfig(**{**FAST, "steps": 1, "learning_rate": 1e-9}, refit=False), progress=False)
    assert plain.record.healing["refit"] == {}
    torch.testing.assert_close(plain.model.state_dict()[down], pruned.model.state_dict()[down])
    orphan = type(pruned)(pruned.model, pruned.tokenizer, pruned.record, pruned.recipe)  # no original in memory
    assert orphan.heal(HealConfig(**{**FAST, "steps": 1}), progress=False).record.healing["refit"] == {
        "skipped": "no original model (teacher) was given"}
    with pytest.raises(ValueError, match="heal.refit_ridge must be positive"):
        HealConfig(refit_ridge=0)


def test_resume_files_are_safetensors_and_json_and_a_planted_pickle_is_never_loaded(pruned, tmp_path, monkeypatch):
    import pickle

    config = HealConfig(**FAST)
    pruned.heal(config, checkpoint_dir=tmp_path, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([CHECKPOINT_FILE, "heal_checkpoint-3.safetensors"]), names
    meta = json.loads((tmp_path / CHECKPOINT_FILE).read_text())
    assert meta["step"] == 3 and meta["tensors"] == "heal_checkpoint-3.safetensors"

    def never(*args, **kwargs):
        raise AssertionError("torch.load must not be called on a resume file")

    monkeypatch.setattr(torch, "load", never)
    (tmp_path / "heal_checkpoint.pt").write_bytes(pickle.dumps({"planted": True}))  # the old name: ignored
    assert pruned.heal(config, checkpoint_dir=tmp_path, progress=False).record.healing["resumed_from"] == 3
    meta["tensors"] = "../../etc/passwd"  # a path elsewhere is read as a bare name in the folder
    (tmp_path / CHECKPOINT_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="cannot be read"):
        pruned.heal(config, checkpoint_dir=tmp_path, progress=False)


def test_a_moe_stack_is_cut_and_healed_on_attention_and_shared_experts(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    torch.manual_seed(0)
    config = Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=6, num_experts=4, num_experts_per_tok=2, vocab_size=len(tokenizer),
                            bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    pruned = LayerPruner.from_pretrained(tmp_path / "moe", device="cpu").prune(layers=[2, 3])
    total = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert pruned.record.parameters_before == total  # the experts are counted
    before = _state(pruned.model)
    healed = pruned.heal(HealConfig(**FAST), progress=False)
    changed = [k for k, v in _state(healed.model).items() if not torch.equal(v, before[k])]
    assert any("self_attn" in k for k in changed) and any("shared_expert." in k for k in changed)
    assert not any(k.endswith("mlp.gate.weight") for k in changed), "the router was trained"
    out = healed.save_pretrained(tmp_path / "healed")
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, healed.model(ids).logits)


def test_models_load_without_hub_kernels(tiny_model_dir):
    """transformers 5 swaps in kernels fetched from the Hub by default on CUDA (code from the network, and a
    heal that fails offline at model.train()); every hubprune load turns that off, on any device."""
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir).use_kernels, "transformers' default changed"
    pruner = LayerPruner.from_pretrained(tiny_model_dir)
    assert pruner.model.use_kernels is False
    healed = pruner.prune(layers=[1]).heal(HealConfig(**{**FAST, "steps": 1}))
    assert healed.model.use_kernels is False


def test_the_bitsandbytes_hub_kernel_notice_is_dropped_and_nothing_else(caplog):
    import logging

    import hubprune.heal  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "offline")
        logger.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
