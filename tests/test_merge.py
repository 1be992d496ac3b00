"""The file-level LoRA merge equals peft's merge_and_unload + save_pretrained, tensor for tensor."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import checkpoint_tensors as _tensors
from conftest import folder_digest, tiny_gpt2, tiny_llama
from hubprune.architecture.filesurgery import INDEX_FILE, shard_files
from hubprune.heal.merge import merge_adapter_into_checkpoint


def _tied_llama():
    from transformers import AutoModelForCausalLM

    model = tiny_llama(num_layers=3)
    model.config.tie_word_embeddings = True
    return AutoModelForCausalLM.from_config(model.config).eval()


def _with_adapter(model, targets, tmp_path, **lora):
    """The model saved to src/, a LoRA with random (non-zero) B saved to adapter/, and the peft-merged copy."""
    from peft import LoraConfig, get_peft_model

    model.save_pretrained(tmp_path / "src", max_shard_size=lora.pop("shard_size", "10GB"))
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_merge_equals_peft_on_a_sharded_checkpoint(tmp_path, tokenizer, dtype):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(num_layers=3).to(dtype)
    peft_model = _with_adapter(model, ["q_proj", "v_proj", "down_proj"], tmp_path, shard_size="20KB")
    tokenizer.save_pretrained(tmp_path / "src")
    source = folder_digest(tmp_path / "src")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "memory")

    out = merge_adapter_into_checkpoint(tmp_path / "src", tmp_path / "adapter", tmp_path / "file", progress=False)
    assert len(shard_files(out)) > 1 and (out / INDEX_FILE).read_text() == (tmp_path / "src" / INDEX_FILE).read_text()
    merged, expected, before = _tensors(out), _tensors(tmp_path / "memory"), _tensors(tmp_path / "src")
    assert merged.keys() == expected.keys()
    changed = set()
    for name, tensor in expected.items():
        assert merged[name].dtype == dtype, name
        tol = dict(rtol=0, atol=2 * torch.finfo(dtype).eps * tensor.abs().max().item())  # peft adds in dtype
        torch.testing.assert_close(merged[name], tensor, **tol, msg=name)
        if not torch.equal(merged[name], before[name]):
            changed.add(name)
            assert (merged[name].float() - before[name].float()).abs().max() > 10 * tol["atol"], name
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for name in changed)
    assert len(changed) == 3 * 3
    assert folder_digest(tmp_path / "src") == source  # the source folder is never written
    assert (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 41, 42]])
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "memory", dtype=torch.float32).eval()
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, rtol=0.05, atol=0.05)


def test_merge_of_tied_embeddings_and_of_a_state_dict(tmp_path):
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    peft_model = _with_adapter(_tied_llama(), ["q_proj", "o_proj", "up_proj"], tmp_path)
    state, config = get_peft_model_state_dict(peft_model), peft_model.peft_config["default"]
    peft_model.merge_and_unload().save_pretrained(tmp_path / "memory")

    out = merge_adapter_into_checkpoint(tmp_path / "src", state, tmp_path / "file", lora_config=config, progress=False)
    merged, expected = _tensors(out), _tensors(tmp_path / "memory")
    assert merged.keys() == expected.keys() and "lm_head.weight" not in merged  # stored once
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_merge_of_gpt2_conv1d_weights(tmp_path):
    """GPT-2 stores its projections as [in, out] (Conv1D): peft merges the transposed delta."""
    peft_model = _with_adapter(tiny_gpt2(num_layers=3), ["c_attn", "c_fc"], tmp_path, fan_in_fan_out=True)
    peft_model.merge_and_unload().save_pretrained(tmp_path / "memory")
    out = merge_adapter_into_checkpoint(tmp_path / "src", tmp_path / "adapter", tmp_path / "file", progress=False)
    merged, expected = _tensors(out), _tensors(tmp_path / "memory")
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_merge_updates_the_record_and_card(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from hubprune import LayerPruner
    from hubprune.heal.lora import HealReport

    folder = LayerPruner.from_pretrained(tiny_model_dir, device="cpu").prune(layers=[2, 3]).save_pretrained(
        tmp_path / "pruned", plot=False)
    _with_adapter(AutoModelForCausalLM.from_pretrained(folder), ["q_proj"], tmp_path / "x")
    report = HealReport(method="qlora", steps=3, tokens=96, seconds=1.0, tokens_per_second=96.0, first_loss=5.0,
                        final_loss=4.0, data={"source": "wiki corpus (train split)"},
                        config={"method": "qlora", "lora_r": 4, "lora_alpha": 8}).to_dict()
    out = merge_adapter_into_checkpoint(folder, tmp_path / "x" / "adapter", tmp_path / "healed", healing=report,
                                        progress=False)
    record = json.loads((out / "hubprune.json").read_text())
    assert record["healing"] == report and record["removed_layers"] == [2, 3]
    card = (out / "README.md").read_text()
    assert "QLoRA (4-bit NF4)" in card and 'from_pretrained("healed")' in card  # not the temporary folder's name
    assert (out / "hubprune_recipe.yaml").is_file() and (out / "tokenizer.json").is_file()
    assert "hubprune.json" in {p.name for p in folder.iterdir()} and not json.loads(
        (folder / "hubprune.json").read_text())["healing"]


def test_merge_refuses_bad_input(tmp_path):
    from peft import get_peft_model_state_dict

    peft_model = _with_adapter(tiny_llama(num_layers=3), ["q_proj"], tmp_path)
    other = tmp_path / "other"
    tiny_llama(num_layers=3, vocab_size=300).save_pretrained(other)
    wider = tmp_path / "wider"
    from transformers import AutoModelForCausalLM, LlamaConfig

    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                                 num_key_value_heads=2, num_hidden_layers=3,
                                                 vocab_size=300)).save_pretrained(wider)
    shallow = tmp_path / "shallow"
    tiny_llama(num_layers=1).save_pretrained(shallow)
    adapter = tmp_path / "adapter"
    with pytest.raises(ValueError, match="does not fit model.layers.0.self_attn.q_proj.weight.*another model"):
        merge_adapter_into_checkpoint(wider, adapter, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="does not hold: the adapter was made for another model"):
        merge_adapter_into_checkpoint(shallow, adapter, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="not a transformers checkpoint folder"):
        merge_adapter_into_checkpoint(tmp_path / "missing", adapter, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        merge_adapter_into_checkpoint(other, tmp_path / "missing", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="needs lora_config="):
        merge_adapter_into_checkpoint(other, get_peft_model_state_dict(peft_model), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="use_dora=True"):
        merge_adapter_into_checkpoint(other, get_peft_model_state_dict(peft_model), tmp_path / "out",
                                      lora_config={"r": 4, "lora_alpha": 8, "use_dora": True}, progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        merge_adapter_into_checkpoint(other, adapter, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="source model's folder"):
        merge_adapter_into_checkpoint(other, adapter, other, overwrite=True, progress=False)
    assert not list((tmp_path / "out").iterdir())
