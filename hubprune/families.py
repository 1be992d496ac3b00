"""Where each supported architecture keeps its decoder layers.

Every family is one row: the dotted path (from the ``*ForCausalLM`` object) to the
``nn.ModuleList`` of decoder layers, the path to the norm applied after the last layer
(its *input* is the pre-norm residual stream the scan needs), and the linear projections
inside a layer that LoRA healing targets. Nothing assumes ``model.model.layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """How one architecture family lays out its decoder stack."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lora_targets: tuple[str, ...] = _LLAMA_LIKE
    # The layer's MLP output projection, where its output is added straight to the residual
    # stream (None where the family normalises it first): what hubprune.refit refits.
    mlp_out: str | None = "mlp.down_proj"


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
    Family("gemma2", ("gemma2",), mlp_out=None),  # post-feedforward norm
    Family("gemma3", ("gemma3_text",), mlp_out=None),
    Family("phi3", ("phi3",), lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    Family("olmo2", ("olmo2",), mlp_out=None),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        mlp_out="mlp.dense_4h_to_h",
    ),
    Family("gpt2", ("gpt2",), layers="transformer.h", final_norm="transformer.ln_f", lora_targets=("c_attn", "c_proj", "c_fc"),
           mlp_out="mlp.c_proj"),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def supported_families() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_of(model_or_config) -> Family:
    """The family of a model (or its config); refuses architectures hubprune cannot cut.

    Example: ``family_of(AutoConfig.from_pretrained("gpt2")).layers == "transformer.h"``
    """
    config = getattr(model_or_config, "config", model_or_config)
    family = _BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if family is None:
        name = type(model_or_config).__name__ if hasattr(model_or_config, "config") else None
        name = name or ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        raise ValueError(
            f"unsupported architecture {name} (model_type {getattr(config, 'model_type', None)!r}); "
            f"hubprune supports these families: {supported_families()}"
        )
    return family


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, value)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, in order (index = 0-based layer number)."""
    return get_module(model, family_of(model).layers)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last layer; its input is the last layer's pre-norm output."""
    return get_module(model, family_of(model).final_norm)
