"""The streamed (layer-by-layer) scan gives the in-memory scan's scores."""

from __future__ import annotations

import pytest
import torch

from hubprune.calibration import TokenWindows, calibration_windows
from hubprune.config import CalibrationConfig
from hubprune.methods.scan import scan_model
from hubprune.methods.streamscan import streamed_scan


def _assert_same_scores(a, b, tol):
    assert a.num_layers == b.num_layers
    for n in range(1, a.num_layers):
        for metric in ("angular_last", "angular_all"):
            for x, y in zip(getattr(a, metric)[n - 1], getattr(b, metric)[n - 1]):
                assert x == pytest.approx(y, abs=tol), (metric, n)
    for x, y in zip(a.block_influence, b.block_influence):
        assert x == pytest.approx(y, abs=tol)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_streamed_scan_equals_in_memory_scan_on_tiny_models(tmp_path, family):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    config = {
        "llama": LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=5, vocab_size=300),
        "gpt2": GPT2Config(n_embd=32, n_head=4, n_layer=5, vocab_size=300, n_positions=64),
        "gemma3": Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=8, num_hidden_layers=5, vocab_size=300, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]),
    }[family]
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "m", max_shard_size="30KB")
    windows = TokenWindows(torch.randint(3, 300, (6, 24)), ["x"], "random")
    in_memory = scan_model(model, windows, batch_size=6, progress=False)
    streamed = streamed_scan(tmp_path / "m", windows, progress=False)
    _assert_same_scores(streamed, in_memory, 1e-5)


@pytest.mark.slow
def test_streamed_scan_equals_in_memory_scan_on_smollm2(smollm2):
    folder = smollm2.origin.path  # the converted safetensors folder
    windows = calibration_windows(smollm2.tokenizer, None, CalibrationConfig(n_samples=16, seq_len=256))
    in_memory = scan_model(smollm2.model, windows, batch_size=4, progress=False)
    streamed = streamed_scan(folder, windows, progress=False)
    _assert_same_scores(streamed, in_memory, 1e-4)
    assert streamed.choose(6) == in_memory.choose(6)


def test_streaming_pruner_cuts_files_like_the_in_memory_pruner(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from hubprune import LayerPruner
    from hubprune.record import PruneRecord

    outputs = {}
    for streaming in (True, False):
        pruner = LayerPruner.from_pretrained(tiny_model_dir, device="cpu", streaming=streaming)
        assert pruner.streaming is streaming and pruner.num_layers == 6
        pruner.scan(n_samples=4, seq_len=32, progress=False)
        outputs[streaming] = pruner.prune(n_layers=2).save_pretrained(tmp_path / str(streaming))
    streamed, in_memory = (PruneRecord.load(outputs[s]) for s in (True, False))
    assert streamed.removed_layers == in_memory.removed_layers
    assert (streamed.parameters_before, streamed.parameters_after) == (in_memory.parameters_before, in_memory.parameters_after)
    a, b = load_file(outputs[True] / "model.safetensors"), load_file(outputs[False] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (outputs[True] / "hubprune_scan.png").is_file() and (outputs[True] / "README.md").is_file()
    pruner = LayerPruner.from_pretrained(tiny_model_dir, device="cpu", streaming=True)
    with pytest.raises(ValueError, match="needs the model in memory"):
        pruner.scan(n_samples=2, seq_len=16, loss_block_sizes=[2], progress=False)
    with pytest.raises(ValueError, match="not in memory"):
        pruner.prune(layers=[1]).heal(steps=1)


def test_cli_streaming_flag(tiny_model_dir, tmp_path):
    from hubprune.cli import main

    assert main(["prune", str(tiny_model_dir), "--drop", "2", "--streaming", "on", "--out", str(tmp_path / "o"),
                 "--n-samples", "2", "--seq-len", "16", "-q"]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
