"""Surgery on a tiny random model of every supported family: prune, forward, cached generation, save, reload."""

from __future__ import annotations

import pytest
import torch

from hubprune.families import FAMILIES, decoder_layers
from hubprune.surgery import drop_layers

SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=6, vocab_size=128, max_position_embeddings=128)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention",
           "sliding_attention"]


def build(family: str):
    """A tiny random model; the sliding-window families get a window (8) shorter than the test prompts."""
    import transformers as tf

    configs = {
        "llama": lambda: tf.LlamaConfig(**SIZES),
        "mistral": lambda: tf.MistralConfig(**SIZES, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=8, max_window_layers=3),
        "qwen3": lambda: tf.Qwen3Config(**SIZES, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**SIZES, head_dim=8, sliding_window=8, layer_types=SLIDING),
        "gemma3": lambda: tf.Gemma3TextConfig(**SIZES, head_dim=8, sliding_window=8, layer_types=SLIDING),
        "phi3": lambda: tf.Phi3Config(**SIZES, pad_token_id=0),
        "olmo2": lambda: tf.Olmo2Config(**SIZES),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                             num_hidden_layers=6, vocab_size=128, max_position_embeddings=128),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_head=4, n_layer=6, vocab_size=128, n_positions=128,
                                      bos_token_id=0, eos_token_id=0),
    }
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(configs[family]()).eval()


def layer_indices(model) -> list[int]:
    return [m.layer_idx for layer in decoder_layers(model) for m in layer.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and m is not layer]


PROMPT = torch.tensor([[5, 17, 33, 2, 90, 41, 8, 64, 12, 3, 77, 29]])  # 12 tokens: longer than the window


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
@pytest.mark.parametrize("drop", [[1, 2], [0, 3, 5]], ids=["block", "scattered"])
def test_prune_generate_save_reload(family, drop, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(family)
    with torch.no_grad():
        before = model(PROMPT).logits
    original_config = model.config.to_dict()
    original_indices = layer_indices(model)

    pruned = drop_layers(model, drop)
    kept = [i for i in range(6) if i not in drop]
    assert pruned.config.num_hidden_layers == len(kept) == len(decoder_layers(pruned))
    per_layer = layer_indices(pruned)
    assert per_layer and sorted(set(per_layer)) == list(range(len(kept)))
    for position, layer in enumerate(decoder_layers(pruned)):
        assert all(m.layer_idx == position for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))
    for key in ("layer_types",):
        if original_config.get(key):
            assert pruned.config.layer_types == [original_config[key][i] for i in kept]
    if family == "qwen2":
        assert pruned.config.max_window_layers == sum(1 for i in kept if i < 3)

    # the original is untouched
    assert model.config.to_dict() == original_config and layer_indices(model) == original_indices
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, before)

    with torch.no_grad():
        cached = pruned.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = pruned.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)

    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == len(kept)
    if original_config.get("layer_types"):
        assert reloaded.config.layer_types == pruned.config.layer_types
    if family == "qwen2":
        assert reloaded.config.max_window_layers == pruned.config.max_window_layers
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROMPT).logits, pruned(PROMPT).logits)
        assert torch.equal(reloaded.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0), cached)


def test_unsupported_architecture_is_named():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(hidden_size=16, n_head=2, n_layer=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"unsupported architecture BloomForCausalLM .*supports these families: llama, mistral"):
        drop_layers(model, [0])


def test_gpt2_scaled_by_layer_index_keeps_only_suffix_cuts():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_head=4, n_layer=6, vocab_size=128,
                                             scale_attn_by_inverse_layer_idx=True)).eval()
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        drop_layers(model, [2])
    pruned = drop_layers(model, [4, 5])
    with torch.no_grad():
        full = model(PROMPT, output_hidden_states=True).hidden_states[4]
        cut = pruned.transformer.h  # the kept layers compute what they computed before
        assert len(cut) == 4
        hidden = pruned(PROMPT, output_hidden_states=True).hidden_states[4]
    torch.testing.assert_close(hidden, pruned.transformer.ln_f(full))
