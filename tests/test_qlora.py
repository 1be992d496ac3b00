"""QLoRA healing of a folder: loaded straight into 4-bit (never full precision), merged at file level.

Runs wherever bitsandbytes runs 4-bit NF4: on the CPU (bitsandbytes 0.50 has CPU kernels)
and, marked ``gpu``, on a CUDA GPU. Each case skips with the reason when it cannot run.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import checkpoint_tensors, folder_digest, tiny_llama
from hubprune.config import HealConfig
from hubprune.heal.qlora import heal_checkpoint

FAST = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--lr", "0.01"]


def _qlora_skip(device: str) -> str | None:
    from hubprune.heal.fourbit import require_qlora

    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        require_qlora(torch.device(device))
    except ValueError as err:
        return str(err)
    return None


@pytest.fixture()
def pruned_dir(tokenizer, tmp_path):
    # Hidden size 64, a whole NF4 block: bitsandbytes' CPU inference path (taken on CPUs with AVX512-BF16,
    # for a model in eval mode such as the teacher) repacks each weight per 64-wide block.
    from hubprune import LayerPruner

    source = tmp_path / "tiny-llama-64"
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(source)
    tokenizer.save_pretrained(source)
    pruner = LayerPruner.from_pretrained(source, device="cpu")
    return pruner.prune(layers=[2, 3]).save_pretrained(tmp_path / "pruned", plot=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_qlora_heal_loads_4bit_only_and_merges_at_file_level(device, pruned_dir, tmp_path, monkeypatch, capsys):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import hubprune.heal.qlora as qlora
    from hubprune.cli import main

    if reason := _qlora_skip(device):
        pytest.skip(reason)
    loads, students = [], []
    original = AutoModelForCausalLM.from_pretrained

    def spy_load(*args, **kwargs):  # every model load of the qlora path must be a 4-bit one
        loads.append(kwargs.get("quantization_config"))
        return original(*args, **kwargs)

    def spy_heal(model, *args, **kwargs):
        students.append({type(m) for name, m in model.named_modules() if name.endswith(("_proj",))})
        return heal_model(model, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the qlora path loaded a full-precision model")

    heal_model = qlora.heal_model
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy_load)
    monkeypatch.setattr(qlora, "heal_model", spy_heal)
    monkeypatch.setattr("hubprune.loading.load_located", refuse)
    monkeypatch.setattr("hubprune.pruner.PrunedModel.from_pretrained", refuse)
    source = folder_digest(pruned_dir)

    out = tmp_path / "healed"
    rc = main(["heal", str(pruned_dir), "--out", str(out), "--method", "qlora", "--distill", "0.5", "--keep-adapter",
               "--device", device, "-q", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert "healed 3 steps (qlora+distill)" in capsys.readouterr().out
    assert len(loads) == 2 and all(q is not None and q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" for q in loads)
    assert students == [{bnb.nn.Linear4bit}]  # student and teacher in 4-bit: no full-precision copy
    monkeypatch.undo()
    assert folder_digest(pruned_dir) == source

    record = json.loads((out / "hubprune.json").read_text())
    assert record["healing"]["method"] == "qlora+distill" and record["removed_layers"] == [2, 3]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert "QLoRA (4-bit NF4)" in (out / "README.md").read_text()
    assert "method: qlora" in (out / "hubprune_recipe.yaml").read_text()
    assert not list(tmp_path.glob(".healed.heal-checkpoints"))

    # The merged weights are the trained adapter on the full-precision weights, as peft merges it.
    before, after = checkpoint_tensors(pruned_dir), checkpoint_tensors(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith("_proj.weight") for name in changed)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned_dir), out / "adapter")
    expected = reference.merge_and_unload().state_dict()
    for name, tensor in after.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    healed = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    cached = healed.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, healed.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))


def test_heal_checkpoint_refuses_bad_input(pruned_dir, tmp_path, tiny_model_dir):
    qlora = HealConfig(method="qlora", steps=1)
    with pytest.raises(ValueError, match="trains QLoRA.*set method='qlora'"):
        heal_checkpoint(pruned_dir, tmp_path / "out", HealConfig(steps=1))
    with pytest.raises(FileNotFoundError, match="no hubprune.json: give a folder written by hubprune prune"):
        heal_checkpoint(tiny_model_dir, tmp_path / "out", qlora)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        heal_checkpoint(pruned_dir, tmp_path / "out", qlora)
    with pytest.raises(ValueError, match="source model's folder"):
        heal_checkpoint(pruned_dir, pruned_dir, qlora, overwrite=True)
