"""``drop_layers`` on tiny random models of ten families (tests/test_arch_coverage.py covers every other type).

Each model is built from a config (hidden 32, 4 heads, 2 KV heads where the family has
them, 6 layers, vocab 128) with seeded random weights; nothing comes from the Hub. The
sliding-window families get a window of 8 and a 12-token prompt, so their sliding layers
see a different context than their full-attention layers and a wrongly sliced
``layer_types`` would change the logits.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hubprune.architecture.families import decoder_layers, family_of
from hubprune.architecture.surgery import drop_layers

NUM_LAYERS = 6
WINDOW = 8
PROMPT = torch.tensor([[5, 17, 33, 2, 90, 41, 8, 64, 12, 3, 77, 29]])  # 12 tokens > WINDOW
assert PROMPT.shape[1] > WINDOW

SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=NUM_LAYERS, vocab_size=128, max_position_embeddings=128)
ALTERNATING = ["sliding_attention", "full_attention"] * (NUM_LAYERS // 2)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SIZES),
    "mistral": lambda: tf.MistralConfig(**SIZES, sliding_window=WINDOW),
    # layer_types = full, full, full, sliding, sliding, sliding (layers >= max_window_layers slide)
    "qwen2": lambda: tf.Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3),
    "qwen3": lambda: tf.Qwen3Config(**SIZES, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**SIZES, head_dim=8, sliding_window=WINDOW, layer_types=ALTERNATING),
    "gemma3": lambda: tf.Gemma3TextConfig(**SIZES, head_dim=8, sliding_window=WINDOW, layer_types=ALTERNATING),
    "phi3": lambda: tf.Phi3Config(**SIZES, pad_token_id=0),
    "olmo2": lambda: tf.Olmo2Config(**SIZES),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_hidden_layers=NUM_LAYERS, vocab_size=128, max_position_embeddings=128),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_head=4, n_layer=NUM_LAYERS, vocab_size=128, n_positions=128),
}
FAMILY_NAMES = list(CONFIGS)
SLIDING_FAMILIES = ["qwen2", "gemma2", "gemma3"]  # the ones whose config has a per-layer list that matters
DROPS = pytest.mark.parametrize("drop", [[1, 2], [0, 3, 5]], ids=["block", "scattered"])


pytestmark = pytest.mark.usefixtures("one_thread")



def build(family: str, **overrides):
    torch.manual_seed(0)
    config = CONFIGS[family]()
    for key in ("bos_token_id", "eos_token_id"):  # the defaults of some families lie outside the tiny vocab
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= config.vocab_size:
            setattr(config, key, None)
    for key, value in overrides.items():
        setattr(config, key, value)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def layer_indices(model) -> list[list[int]]:
    """For each decoder layer, the ``layer_idx`` of every submodule that has one."""
    return [[m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
            for layer in decoder_layers(model)]


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(PROMPT).logits


@torch.no_grad()
def greedy(model, use_cache: bool = True) -> torch.Tensor:
    return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=8, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


def kept_after(drop: list[int]) -> list[int]:
    return [i for i in range(NUM_LAYERS) if i not in drop]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@DROPS
def test_drop_renumbers_layers_and_leaves_original_untouched(family, drop):
    model = build(family)
    config_before = model.config.to_dict()
    indices_before = layer_indices(model)
    layers_before = list(decoder_layers(model))
    logits_before = logits(model)

    pruned = drop_layers(model, drop)

    kept = kept_after(drop)
    assert pruned.config.num_hidden_layers == len(kept) == NUM_LAYERS - len(drop)
    assert len(decoder_layers(pruned)) == len(kept)
    indices = layer_indices(pruned)
    assert all(indices), f"every {family} layer should have an attention module with a layer_idx"
    assert indices == [[position] * len(found) for position, found in enumerate(indices)]
    # the kept layers are the original ones (weights shared), in order
    for position, original in enumerate(kept):
        ours, theirs = decoder_layers(pruned)[position], layers_before[original]
        assert all(a is b for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))

    assert model.config.to_dict() == config_before
    assert model.config.num_hidden_layers == NUM_LAYERS
    assert list(decoder_layers(model)) == layers_before
    assert layer_indices(model) == indices_before == [[i] * len(found) for i, found in enumerate(indices_before)]
    torch.testing.assert_close(logits(model), logits_before, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@DROPS
def test_pruned_cached_generation_matches_uncached(family, drop):
    pruned = drop_layers(build(family), drop)
    out = logits(pruned)
    assert out.shape == (1, PROMPT.shape[1], 128) and torch.isfinite(out).all()
    cached = greedy(pruned, use_cache=True)
    assert cached.shape == (1, PROMPT.shape[1] + 8)
    assert torch.equal(cached, greedy(pruned, use_cache=False))


@pytest.mark.parametrize("family", FAMILY_NAMES)
@DROPS
def test_pruned_model_saves_and_reloads_with_auto_class(family, drop, tmp_path):
    pruned = drop_layers(build(family), drop)
    pruned.save_pretrained(tmp_path)

    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    assert type(reloaded) is type(pruned)
    assert reloaded.config.num_hidden_layers == len(decoder_layers(reloaded)) == NUM_LAYERS - len(drop)
    assert layer_indices(reloaded) == layer_indices(pruned)
    torch.testing.assert_close(logits(reloaded), logits(pruned))
    assert torch.equal(greedy(reloaded), greedy(pruned))


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
@DROPS
def test_per_layer_config_is_sliced(family, drop, tmp_path):
    model = build(family)
    original_types = list(model.config.layer_types)
    assert set(original_types) == {"sliding_attention", "full_attention"}
    kept = kept_after(drop)

    pruned = drop_layers(model, drop)

    expected = [original_types[i] for i in kept]
    assert list(pruned.config.layer_types) == expected
    if family == "qwen2":
        assert original_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
        assert pruned.config.max_window_layers == sum(1 for i in kept if i < 3)
        assert model.config.max_window_layers == 3
    # each kept attention module still slides exactly when its config entry says so
    for layer, layer_type in zip(decoder_layers(pruned), expected, strict=True):
        assert (layer.self_attn.sliding_window == WINDOW) == (layer_type == "sliding_attention")

    pruned.save_pretrained(tmp_path)
    saved = tf.AutoConfig.from_pretrained(tmp_path)
    assert list(saved.layer_types) == expected
    if family == "qwen2":
        assert saved.max_window_layers == pruned.config.max_window_layers
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert list(reloaded.config.layer_types) == expected
    torch.testing.assert_close(logits(reloaded), logits(pruned))

    # the window really matters here: the same weights with every layer attending fully differ
    all_full = tf.AutoModelForCausalLM.from_pretrained(tmp_path, layer_types=["full_attention"] * len(kept)).eval()
    assert not torch.allclose(logits(all_full), logits(pruned))


@pytest.mark.parametrize("config", [
    tf.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=NUM_LAYERS, vocab_size=128),
    tf.BloomConfig(hidden_size=32, n_head=4, n_layer=NUM_LAYERS, vocab_size=128),
], ids=lambda c: c.model_type)
def test_architectures_not_listed_are_found_in_the_module_tree(config, tmp_path):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    family = family_of(model)
    assert family.layers.endswith(".h") and family.final_norm.endswith("ln_f")
    assert family == family_of(config)  # found from the config alone (a meta-device skeleton) too
    pruned = drop_layers(model, [1, 2])
    assert layer_indices(pruned) == [[i] * len(layer_indices(model)[0]) for i in range(NUM_LAYERS - 2)]
    assert torch.equal(greedy(pruned, use_cache=True), greedy(pruned, use_cache=False))
    pruned.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(pruned))


def test_a_periodic_moe_step_becomes_an_explicit_list_of_dense_layers():
    torch.manual_seed(0)
    config = tf.Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                               shared_expert_intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=NUM_LAYERS, num_experts=4, num_experts_per_tok=2, vocab_size=128,
                               decoder_sparse_step=2, mlp_only_layers=[])  # odd layers (1, 3, 5) are MoE
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    pruned = drop_layers(model, [1, 2])  # kept 0 3 4 5: dense, MoE, dense, MoE
    assert pruned.config.decoder_sparse_step == 1 and pruned.config.mlp_only_layers == [0, 2]
    kinds = [type(layer.mlp).__name__ for layer in decoder_layers(pruned)]
    assert kinds == [type(decoder_layers(model)[i].mlp).__name__ for i in (0, 3, 4, 5)]
    assert torch.equal(greedy(pruned, use_cache=True), greedy(pruned, use_cache=False))


def test_gpt2_scaled_by_layer_index_only_drops_a_suffix(tmp_path):
    model = build("gpt2", scale_attn_by_inverse_layer_idx=True)
    for drop in ([2], [1, 2], [0], [3, 5]):
        with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx") as error:
            drop_layers(model, drop)
        assert "last layers" in str(error.value)
    assert model.config.num_hidden_layers == NUM_LAYERS and len(decoder_layers(model)) == NUM_LAYERS

    pruned = drop_layers(model, [4, 5])
    assert pruned.config.num_hidden_layers == 4 and layer_indices(pruned) == [[i] * 1 for i in range(4)]
    assert torch.equal(greedy(pruned, use_cache=True), greedy(pruned, use_cache=False))
    pruned.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.scale_attn_by_inverse_layer_idx
    torch.testing.assert_close(logits(reloaded), logits(pruned))
    assert torch.equal(greedy(reloaded), greedy(pruned))
