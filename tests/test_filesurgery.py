"""File-level surgery equals in-memory surgery followed by save_pretrained, tensor for tensor."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import checkpoint_tensors as _tensors
from conftest import tiny_gpt2 as _gpt2
from hubprune.architecture.filesurgery import INDEX_FILE, cut_checkpoint, shard_files
from hubprune.architecture.surgery import drop_layers


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=6, vocab_size=300, use_sliding_window=True, sliding_window=8,
                         max_window_layers=3, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("build", [_gpt2, _qwen2], ids=["gpt2", "qwen2"])
@pytest.mark.parametrize("shard_size", ["20KB", "10GB"], ids=["sharded", "single"])
def test_cut_equals_in_memory_surgery(tmp_path, tokenizer, build, shard_size):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = build()
    model.save_pretrained(tmp_path / "src", max_shard_size=shard_size)
    tokenizer.save_pretrained(tmp_path / "src")
    drop = [1, 2, 4]
    drop_layers(model, drop).save_pretrained(tmp_path / "memory")
    out = cut_checkpoint(tmp_path / "src", tmp_path / "file", drop, progress=False)

    file_tensors, memory_tensors = _tensors(out), _tensors(tmp_path / "memory")
    assert file_tensors.keys() == memory_tensors.keys()
    for name, tensor in memory_tensors.items():
        assert torch.equal(file_tensors[name], tensor), name
    file_config, memory_config = (AutoConfig.from_pretrained(p).to_dict() for p in (out, tmp_path / "memory"))
    assert {**file_config, "_name_or_path": ""} == {**memory_config, "_name_or_path": ""}
    if shard_size == "20KB":
        index = json.loads((out / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(file_tensors) and len(shard_files(out)) > 1
    assert (out / "tokenizer.json").is_file()
    assert 'from_pretrained("file")' in (out / "README.md").read_text()  # the card names the output, not its temp folder
    record = json.loads((out / "hubprune.json").read_text())
    assert record["removed_layers"] == drop and record["kept_layers"] == [0, 3, 5]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    cached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))


def test_cut_refuses_bad_input(tmp_path):
    model = _gpt2()
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="out of range"):
        cut_checkpoint(tmp_path / "src", tmp_path / "out", [6], progress=False)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        cut_checkpoint(tmp_path / "nope", tmp_path / "out", [1], progress=False)
    with pytest.raises(ValueError, match="source model's folder"):
        cut_checkpoint(tmp_path / "src", tmp_path / "src", [1], overwrite=True, progress=False)
    assert not (tmp_path / "out").exists()
