"""Where a causal LM keeps its decoder layers: found in the module tree, not listed.

A ``Family`` says, from the ``*ForCausalLM`` object: the dotted path to the ``nn.ModuleList``
of decoder layers, the path to the norm applied after the last layer (its *input* is the
pre-norm residual stream the scan needs), the linear projections inside a layer that LoRA
healing targets, and the MLP output projection the refit may refit. ``family_of`` finds them
for any architecture (``discover``: the one ModuleList with ``num_hidden_layers`` entries of
the text model, the norm beside it, the linear layers inside); ``OVERRIDES`` holds only the
exceptions where the found answer is not the right one. Nothing assumes ``model.model.layers``.
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Family:
    """How one architecture family lays out its decoder stack."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    final_norm: str | None = "model.norm"  # None: a post-norm stack with no final norm
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # The layer's MLP output projection, where its output is added straight to the residual
    # stream (None where the family normalises it first): what hubprune.heal.refit refits.
    mlp_out: str | None = "mlp.down_proj"
    # Cache slots (``layer_idx`` values) per decoder layer, where ``num_hidden_layers`` counts slots rather
    # than layers: a LongCat-Flash layer holds two attention sublayers, numbered 2i and 2i + 1.
    slots: int = 1


# Where discovery would answer wrong, a row here says the right answer (none is needed today: every
# architecture the tests build, Llama to GPT-2, Gemma 3, Phi-3 and MoE stacks, is found as it should be).
OVERRIDES: tuple[Family, ...] = ()
_BY_MODEL_TYPE = {model_type: family for family in OVERRIDES for model_type in family.model_types}
# Architectures whose cut model does not compute what its kept layers computed, although each kept
# layer is built the same (found by tests/arch_coverage.py, which compares logits): refused with the reason.
REFUSED = {
    "dory": "a cut changes what its kept layers compute (its forward depends on more than each layer's own settings)",
    "zaya": "a cut changes what its kept layers compute (its forward depends on more than each layer's own settings)",
    "gemma3n_text": "later layers reuse the KV cache of earlier ones by index (num_kv_shared_layers)",
    "gemma3n": "later layers reuse the KV cache of earlier ones by index (num_kv_shared_layers)",
    "inkling2_text": "its config derives sizes from the layer count that a cut makes invalid",
    "inkling2_loop_text": "its config derives sizes from the layer count that a cut makes invalid",
    "zamba": "its layers share one transformer block, tied by layer index, which a cut cannot keep",
    "zamba2": "its hybrid layers map to shared blocks by layer index, which a cut cannot keep",
}
_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its discovered Family
NOT_TEXT = re.compile(r"(^|\.|_)(vision|visual|vit|audio|image|speech|mm_projector|multi_modal)", re.I)  # towers
_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f", "ln_out")
_MLP_OUT = re.compile(r"^(mlp|feed_forward|ffn|ff)\.(down_proj|c_proj|dense_4h_to_h|fc2|fc_out|w2|wo|out_proj)$")
_NORMED_MLP = re.compile(r"post_(feedforward|ffw|mlp|ffn)|ffn_post|post_ff", re.I)  # a norm after the MLP


def family_of(model_or_config) -> Family:
    """Where a model (or a config's model) keeps its layers; refuses what hubprune cannot cut, saying why.

    Example: ``family_of(AutoConfig.from_pretrained("gpt2")).layers == "transformer.h"``
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise ValueError(f"cannot prune model_type {model_type!r}: {REFUSED[model_type]}")
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is not None:
        return family
    if isinstance(model_or_config, nn.Module):
        if model_or_config not in _FOUND:
            _FOUND[model_or_config] = discover(model_or_config)
        return _FOUND[model_or_config]
    return _discover_config(_config_key(config), type(config))  # type: ignore[arg-type]  # a class is hashable


def discover(model: nn.Module) -> Family:
    """Find the decoder stack of ``model`` (see the module docstring); ValueError says why it cannot."""
    config: Any = model.config  # a transformers PretrainedConfig
    model_type = getattr(config, "model_type", None)
    name = f"{type(model).__name__} (model_type {model_type!r})"
    try:
        n = config.get_text_config().num_hidden_layers
    except AttributeError:
        raise ValueError(f"cannot prune {name}: its config has no num_hidden_layers") from None
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and path]
    text = [(p, m) for p, m in lists if not NOT_TEXT.search(p)]
    attention = [
        (p, m) for p, m in text if any(isinstance(getattr(x, "layer_idx", None), int) for x in m[0].modules())
    ]
    candidates = attention or text
    slots = 1
    if not lists:  # num_hidden_layers may count cache slots: a list whose layers each hold several
        stacks = [
            (p, m)
            for p, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and p and not NOT_TEXT.search(p) and len(m) > 1 and n % len(m) == 0
        ]
        candidates = [(p, m) for p, m in stacks if _slot_numbers(m) == list(range(n))]
        slots = n // len(candidates[0][1]) if len(candidates) == 1 else 1
    if len(candidates) > 1:  # an encoder beside the decoder
        candidates = [(p, m) for p, m in candidates if "encoder" not in p] or candidates
    if len(candidates) != 1:
        found = ", ".join(p for p, _ in lists) or "none"
        raise ValueError(f"cannot prune {name}: expected one list of its {n} decoder layers, found {found}")
    layers, stack = candidates[0]
    parent = layers.rpartition(".")[0]
    norm = _final_norm(model, parent) or (_final_norm(model, "") if parent else None)
    return Family(
        model_type or type(model).__name__,
        (model_type,) if model_type else (),
        layers=layers,
        final_norm=norm,
        lora_targets=_linear_names(stack, config),
        mlp_out=_mlp_out(stack[0]),
        slots=slots,
    )


def _holds_slot(module: nn.Module) -> bool:
    return isinstance(getattr(module, "layer_idx", None), int)


def _slot_numbers(stack: nn.ModuleList) -> list[int]:
    """The ``layer_idx`` values held inside the layers of ``stack`` (not by a layer itself), layer by layer."""
    per_layer: list[list[int]] = [
        sorted({getattr(m, "layer_idx") for m in layer.modules() if m is not layer and _holds_slot(m)})
        for layer in stack
    ]
    if len({len(found) for found in per_layer}) != 1:  # every layer holds as many slots
        return []
    return [number for found in per_layer for number in found]


def layer_count(model_or_config) -> int:
    """How many decoder layers a model has: ``num_hidden_layers``, or that over the cache slots per layer."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config().num_hidden_layers // family_of(model_or_config).slots


def _final_norm(model: nn.Module, parent: str) -> str | None:
    owner = get_module(model, parent) if parent else model
    norms = {
        name: m for name, m in owner.named_children() if "norm" in type(m).__name__.lower() or name in _NORM_NAMES
    }
    named = [n for n in _NORM_NAMES if n in norms]
    choice = named[0] if named else next(iter(norms)) if len(norms) == 1 else None
    return None if choice is None else f"{parent}.{choice}".lstrip(".")


def _linear_names(stack: nn.ModuleList, config) -> tuple[str, ...]:
    """Leaf names of the linear layers in the stack (LoRA targets), routers (one output per expert) left out."""
    experts = {
        getattr(config.get_text_config(), k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")
    }
    names = []
    for layer in stack:
        for path, module in layer.named_modules():
            linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
            out = getattr(module, "out_features", None) or getattr(module, "nf", None)
            leaf = path.rpartition(".")[2]
            if linear and out not in experts - {None} and leaf not in names:
                names.append(leaf)
    return tuple(names)


def _mlp_out(layer: nn.Module) -> str | None:
    """The dense MLP's output projection when its output goes straight into the residual stream."""
    if any(_NORMED_MLP.search(path) and "norm" in type(m).__name__.lower() for path, m in layer.named_modules()):
        return None
    found = [
        p
        for p, m in layer.named_modules()
        if _MLP_OUT.match(p) and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    ]
    return found[0] if len(found) == 1 else None


def _config_key(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


@functools.lru_cache(maxsize=32)
def _discover_config(key: str, config_class: type[PretrainedConfig]) -> Family:
    return discover(skeleton(config_class.from_dict(json.loads(key))))


def skeleton(config, model_class: type[PreTrainedModel] | None = None) -> nn.Module:
    """The model a config describes, with every weight on the meta device (no memory, no time).

    ``model_class``: the class to build (default: the causal-LM class of the config)."""
    cls = model_class or causal_lm_class(config)
    with torch.device("meta"):
        return cls._from_config(config)


def causal_lm_class(config) -> type[PreTrainedModel]:
    """The ``*ForCausalLM`` (or ``*ForConditionalGeneration``) class of a config."""
    import transformers
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]  # type: ignore[return-value]  # typed for tokenizers too
    except KeyError:
        for name in getattr(config, "architectures", None) or []:
            if isinstance(getattr(transformers, name, None), type):
                return getattr(transformers, name)
    raise ValueError(
        f"transformers has no causal-LM class for {type(config).__name__} "
        f"(model_type {getattr(config, 'model_type', None)!r})"
    )


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
    return cast(nn.ModuleList, get_module(model, family_of(model).layers))


def final_hidden_hook(model: nn.Module, fn):
    """Call ``fn(hidden)`` with the residual stream after the last layer on each forward: the final
    norm's input, or the last layer's output in a stack without a final norm. Returns the hook handle
    (``fn`` may raise to stop the forward there)."""
    norm = family_of(model).final_norm
    if norm is not None:
        return get_module(model, norm).register_forward_pre_hook(
            lambda module, args, kwargs: fn(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    return decoder_layers(model)[-1].register_forward_hook(
        lambda module, args, output: fn(output[0] if isinstance(output, (tuple, list)) else output)
    )
