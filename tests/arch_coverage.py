"""Which causal-LM architectures of the installed transformers hubprune prunes, checked on tiny random models.

    .venv/bin/python tests/arch_coverage.py [--types llama,qwen3_moe]
    python3 dev.py coverage          # the same, every model type; prints the README's figure and list

For every model type in transformers' causal-LM auto mapping (encoder-decoder and masked-LM
families are counted apart: they are not decoder-only), build a tiny random config from the
type's defaults (hidden 64, 6 layers, 4 experts, ...; FIXES holds the few settings that real
checkpoints write and the defaults leave unset; a type that cannot be built tiny, or whose
unpruned model does not even reload with AutoModelForCausalLM, is listed with the reason), then:

1. drop 2 layers in memory (hubprune.architecture.surgery.drop_layers): 2 and 3, or the first pair that leaves
   every kind of layer in layer_types at least one (drop_for);
2. the pruned model's logits equal the original's run with those layers skipped
   (identity hooks, no cache): the kept path computes what it computed before;
3. save_pretrained + AutoModelForCausalLM.from_pretrained give the same logits;
4. greedy generation with the KV cache equals generation without it (layer_idx renumbered);
5. the file-level cut (hubprune.architecture.filesurgery.cut_checkpoint) of the saved original reloads
   with the same logits as the in-memory cut.

A type hubprune refuses (ValueError from the cut) is listed with its one-line reason.
tests/test_arch_coverage.py runs this: no type may fail a check, and the share pruned may not drop.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

DROP = [2, 3]
MAX_PARAMETERS = 60e6
SMALL = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
    max_position_embeddings=256, n_embd=64, n_head=4, n_layer=6, d_model=64, ffn_dim=128, num_hidden_layers=6,
    num_layers=6, n_positions=256, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, n_inner=128, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8, sliding_window=64, pad_token_id=0,
    bos_token_id=1, eos_token_id=2, image_size=32, patch_size=8, projection_dim=64, vision_hidden_size=64,
    text_hidden_size=64, mm_tokens_per_image=4, vocab_size_per_layer_input=128, hidden_size_per_layer_input=16,
    n_group=2, topk_group=1, num_expert_group=2,  # expert groups: 2 groups of the 4 experts
    moe_topk=2, zero_expert_num=2, ffn_hidden_size=128, expert_ffn_hidden_size=32,
)
SSM = dict(mamba_n_heads=4, mamba_d_head=32, mamba_expand=2, expand=2, num_heads=8)  # tried second: state-space sizes
HYBRID = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention",
          "linear_attention"]
# Settings a real checkpoint of the type writes but the type's defaults leave unset (or set for the full
# depth only), by the config class they belong to: without them the type's own code fails at 6 layers.
FIXES = {
    "BambaConfig": dict(attn_layer_indices=[1, 4]),  # the default has no attention layer at all
    "GraniteMoeHybridConfig": dict(layer_types=HYBRID),
    "Lfm2MoeConfig": dict(layer_types=[t.replace("linear_attention", "conv") for t in HYBRID]),
    "CohereCompassTextConfig": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "DbrxAttentionConfig": dict(rope_theta=5e5, clip_qkv=8.0),  # its attention reads both; None fails
    "Dots1Config": dict(n_shared_experts=1),
    "Dots3NoteTextConfig": dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16,
                                swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=16),
    "Dots3NoteVisionConfig": dict(pyramid_num_routed=[-1, -1, -1, 4, 4, 4], adapter_in_dim=64, adapter_out_dim=64),
    "Dots3NoteAudioConfig": dict(adapter_input_size=64, adapter_out_dim=64),
    "xLSTMConfig": dict(qk_dim_factor=1.0),  # its native step kernel sizes the state by the value width (0.5 fails)
    "Kolibri1_1Config": dict(index_num_heads=2),  # at most the query heads of one key head
    "NemotronHConfig": dict(layers_block_type=["linear_attention", "moe", "linear_attention", "moe", "full_attention",
                                               "mlp"]),  # its default is 4 layers, each of a different kind
    "Qwen4ExpTextConfig": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=2),  # its default layer types use the indexer
}
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer")
MLA = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "head_dim", "rotary_dim")


@dataclass
class Outcome:
    model_type: str
    status: str  # pruned | refused | failed | not tiny | not decoder-only
    detail: str = ""


def decoder_only_types() -> tuple[list[str], dict[str, str]]:
    """The causal-LM model types, and the ones set apart with why."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    apart = {t: "a masked-LM (encoder) family" for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
             if t in MODEL_FOR_MASKED_LM_MAPPING_NAMES}
    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in apart), apart


def tiny_configs(model_type: str):
    """The type's default config shrunk by the SMALL fields it has (sub-configs too), then, where the
    type refuses that, with its own layer count and then its own head sizes kept as well."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    for keep, extra in [(k, e) for e in ({}, SSM) for k in ((), LAYER_COUNTS, LAYER_COUNTS + MLA)]:
        for carry in (False, True):
            small = {k: v for k, v in {**SMALL, **extra}.items() if k not in keep}
            for _ in range(3):  # a config that names a field it refuses: leave that field at its default
                try:
                    yield _small(cls, cls(), small, carry)
                    break
                except Exception as err:
                    yield err
                    named = [k for k in small if re.search(rf"\b{k}\b", str(err))]
                    if not named:
                        break
                    small = {k: v for k, v in small.items() if k not in named}


def _small(cls, base, small: dict, carry: bool):
    """``cls`` built from ``small`` (and, with ``carry``, the rest of ``base``'s settings)."""
    from transformers import PretrainedConfig

    fields = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in vars(base).items() if carry and k in fields and not isinstance(v, PretrainedConfig)}
    kwargs.update({k: v for k, v in small.items() if k in fields})
    _keep_ratios(base, kwargs)
    for name, sub in vars(base).items():
        if isinstance(sub, PretrainedConfig) and name in fields:
            kwargs[name] = _small(type(sub), sub, small, carry)
    for derived in ("layer_types", "attention_types", "layers_block_type", "block_types", "no_rope_layers",
                    "moe_layers", "mlp_only_layers", "full_attn_idxs"):
        if derived in kwargs and any(k in small for k in LAYER_COUNTS):
            kwargs[derived] = None  # recomputed for the new layer count
    kwargs.update(FIXES.get(cls.__name__, {}))
    return cls(**kwargs)


def _keep_ratios(base, kwargs: dict) -> None:
    """Shrunken sizes that keep the default's relations: as many KV heads as query heads where the
    default has that (multi-head latent attention needs it)."""
    heads, kv = vars(base).get("num_attention_heads"), vars(base).get("num_key_value_heads")
    if "num_key_value_heads" in kwargs and isinstance(heads, int) and heads == kv:
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", heads)
    rope = vars(base).get("qk_rope_head_dim")
    if "head_dim" in kwargs and rope is not None and vars(base).get("head_dim") == rope:
        kwargs["head_dim"] = kwargs.get("qk_rope_head_dim", rope)  # the rotary part's size
    if "qk_head_dim" in kwargs and "qk_nope_head_dim" in kwargs:
        kwargs["qk_head_dim"] = kwargs["qk_nope_head_dim"] + kwargs["qk_rope_head_dim"]


def build(model_type: str):
    """(config, model, input ids) of the first tiny config that builds and runs; raises the last error."""
    from transformers import AutoModelForCausalLM

    from hubprune.architecture.families import skeleton

    errors = []
    for config in _with_text_configs(tiny_configs(model_type)):
        if isinstance(config, Exception):
            errors.append(config)
            continue
        try:
            if getattr(config, "is_encoder_decoder", False):
                return config, None, None
            size = sum(p.numel() for p in skeleton(config).parameters())
            if size > MAX_PARAMETERS:
                raise ValueError(f"{size / 1e6:.0f}M parameters after shrinking")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
            ids = torch.randint(3, min(100, model.config.get_text_config().vocab_size), (1, 12))
            with torch.no_grad():
                model(input_ids=ids)
            return config, model, ids
        except Exception as err:
            errors.append(err)
    raise errors[0]  # the plainest attempt's reason


def _with_text_configs(configs):
    """Each config, then its text config where it has one (the causal LM of some multimodal types)."""
    for config in configs:
        yield config
        if not isinstance(config, Exception) and config.get_text_config() is not config:
            yield config.get_text_config()


def drop_for(config) -> list[int]:
    """Two layers to drop that leave at least one layer of each kind (layer_types)."""
    types = list(getattr(config.get_text_config(), "layer_types", None) or [])
    for drop in ([2, 3], [1, 2], [3, 4], [0, 1], [1, 4], [2, 4]):
        if not types or set(t for i, t in enumerate(types) if i not in drop) == set(types):
            return drop
    return DROP


def check(model_type: str, folder: Path) -> Outcome:
    """Build, cut, reload and compare one model type (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from hubprune.architecture.families import decoder_layers
    from hubprune.architecture.filesurgery import cut_checkpoint
    from hubprune.architecture.surgery import drop_layers

    try:
        config, model, ids = build(model_type)
    except Exception as err:  # the type's own code refuses every shrunken config
        return Outcome(model_type, "not tiny", _line(err))
    if model is None:
        return Outcome(model_type, "not decoder-only", "an encoder-decoder family")
    size = sum(p.numel() for p in model.parameters())
    drop = drop_for(model.config)
    try:
        pruned = drop_layers(model, drop)
    except ValueError as err:
        return Outcome(model_type, "refused", _line(err))
    except Exception as err:
        return Outcome(model_type, "failed", f"cut: {_line(err)}")
    stage = "kept path"
    try:
        with torch.no_grad():
            expected = _skipping(model, decoder_layers(model), drop, ids)
            got = pruned(input_ids=ids, use_cache=False).logits
            _same(got, expected)
            stage = "reload"
            pruned.save_pretrained(folder / "pruned")
            reloaded = AutoModelForCausalLM.from_pretrained(folder / "pruned").eval()
            _same(reloaded(input_ids=ids, use_cache=False).logits, got)
            stage = "cache"
            mask = torch.ones_like(ids)
            cached = reloaded.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True)
            plain = reloaded.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=False)
            if not torch.equal(cached, plain):
                raise AssertionError(f"greedy tokens differ with the cache: {cached[0, -5:].tolist()} != "
                                     f"{plain[0, -5:].tolist()}")
            stage = "file cut"
            model.save_pretrained(folder / "original")
            cut_checkpoint(folder / "original", folder / "cut", drop, progress=False)
            _same(AutoModelForCausalLM.from_pretrained(folder / "cut").eval()(input_ids=ids, use_cache=False).logits, got)
            stage = "untouched tensors"
            _outside_layers_unchanged(folder / "original", folder / "cut", model.config, drop)
    except Exception as err:
        if stage == "reload" and not _reloads(model, folder / "unpruned"):
            return Outcome(model_type, "not tiny", f"the unpruned model does not reload either: {_line(err)}")
        return Outcome(model_type, "failed", f"{stage}: {_line(err)}")
    return Outcome(model_type, "pruned", f"{type(model).__name__}, {size / 1e6:.1f}M parameters")


def _reloads(model, folder: Path) -> bool:
    """Whether save_pretrained + AutoModelForCausalLM.from_pretrained work for ``model`` as built (they
    do not for a type whose causal-LM class saves a config the Auto class does not map)."""
    from transformers import AutoModelForCausalLM

    try:
        model.save_pretrained(folder)
        AutoModelForCausalLM.from_pretrained(folder)
    except Exception:
        return False
    return True


def _outside_layers_unchanged(source: Path, cut: Path, config, drop: list[int]) -> None:
    """Every tensor outside the decoder layers (embeddings, vision and audio towers, ...) is copied byte for byte;
    one that holds a block per layer (Gemma 4 per-layer embeddings) keeps exactly the kept layers' blocks."""
    from safetensors.torch import load_file

    from hubprune.architecture.families import family_of, layer_count
    from hubprune.architecture.filesurgery import layer_key_pattern
    from hubprune.architecture.perlayer import per_layer_dim, per_layer_width

    def tensors(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    def expected(name: str, tensor: torch.Tensor) -> torch.Tensor:
        dim = per_layer_dim(name, tensor.shape, n, width)
        if dim is None:
            return tensor
        blocks = tensor.unflatten(dim, (n, width))
        return blocks.index_select(dim, torch.tensor([i for i in range(n) if i not in drop])).flatten(dim, dim + 1)

    before, after = tensors(source), tensors(cut)
    n, width = layer_count(config), per_layer_width(config)
    pattern = layer_key_pattern(list(before), n, family_of(config))
    outside = [k for k in before if not pattern.match(k)]
    changed = [k for k in outside if k not in after or not torch.equal(expected(k, before[k]), after[k])]
    if changed:
        raise AssertionError(f"{len(changed)} tensors outside the layers changed or went missing: {changed[:3]}")


def _skipping(model, layers, skip: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The model's logits with the given layers passing their input through unchanged."""

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, (tuple, list)):
            return type(output)([hidden, *output[1:]])
        return hidden

    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in skip]
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        diff = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {tuple(a.shape)} != {tuple(b.shape)}"
        raise AssertionError(f"logits differ (max {diff})")


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def run(types: list[str] | None = None, progress: bool = False) -> list[Outcome]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    decoder, apart = decoder_only_types()
    outcomes = [Outcome(t, "not decoder-only", why) for t, why in apart.items() if not types or t in types]
    for model_type in [t for t in decoder if not types or t in types]:
        with tempfile.TemporaryDirectory(prefix="hubprune-coverage-") as tmp:
            outcome = check(model_type, Path(tmp))
        outcomes.append(outcome)
        if progress:
            print(f"{outcome.status:>16}  {model_type}  {outcome.detail}", flush=True)
    return outcomes


def report(outcomes: list[Outcome]) -> str:
    import transformers

    counts = collections.Counter(o.status for o in outcomes)
    decoder = [o for o in outcomes if o.status != "not decoder-only"]
    share = counts["pruned"] / max(1, len(decoder))
    lines = [f"transformers {transformers.__version__}: pruned {counts['pruned']} of {len(decoder)} decoder-only "
             f"causal-LM model types ({share:.0%}); refused {counts['refused']}, could not be built tiny "
             f"{counts['not tiny']}, failed a check {counts['failed']}; {counts['not decoder-only']} other types "
             "(masked-LM or encoder-decoder) set apart.", ""]
    for status in ("refused", "not tiny", "failed"):
        rows = sorted((o for o in outcomes if o.status == status), key=lambda o: o.model_type)
        if rows:
            lines.append(f"{status}:")
            lines += [f"- `{o.model_type}`: {o.detail}" for o in rows]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: all)")
    args = parser.parse_args(argv)
    outcomes = run(args.types.split(",") if args.types else None, progress=True)
    print("\n" + report(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
