"""Narrow every decoder layer's MLP to one smaller intermediate size, keeping its most important neurons.

A gated MLP computes ``down(act(gate(x)) * up(x))``: neuron ``i`` of the intermediate layer
is row ``i`` of ``gate`` and ``up`` and column ``i`` of ``down``. Its importance is measured on
calibration text as ``mean_t |a_ti| * ||down[:, i]||_2``, where ``a = act(gate(x)) * up(x)``
([tokens, intermediate], the input of ``down``): how much the neuron adds to the residual
stream on average. Each layer keeps its ``round(width * intermediate_size)`` most important
neurons (the same count in every layer, so ``config.intermediate_size`` stays one integer and
the result is a plain checkpoint that ``AutoModelForCausalLM`` loads).

Only MLPs with ``up_proj`` and ``down_proj`` linear layers (and optionally ``gate_proj``) are
narrowed; fused projections (Phi-3's ``gate_up_proj``), GPT-2's ``c_fc``/``c_proj`` and MoE
experts are refused with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hubprune.architecture.families import decoder_layers
from hubprune.calibration import TokenWindows

logger = logging.getLogger(__name__)

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class WidthReport:
    """What narrowing did: the intermediate size before and after, and the text that ranked the neurons."""

    width: float
    intermediate_size_before: int
    intermediate_size_after: int
    importance: str
    tokens: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def check_narrowable(model: Any) -> int:  # a transformers model (its config, its layers)
    """The model's MLP intermediate size; ValueError (one line) if its MLPs cannot be narrowed.

    Works on a meta-device skeleton too (``families.skeleton``), so a run can refuse before loading.
    Example: ``check_narrowable(model) == 1536``
    """
    config = model.config.get_text_config()
    name = getattr(config, "model_type", type(model).__name__)
    experts = [k for k in _EXPERT_KEYS if (getattr(config, k, 0) or 0) > 1]
    if experts:
        raise ValueError(
            f"mlp_width cannot narrow {name}: its MLPs are mixture-of-experts ({experts[0]}="
            f"{getattr(config, experts[0])}); narrowing experts is not supported, drop layers or use sparsity instead"
        )
    size = getattr(config, "intermediate_size", None)
    if not isinstance(size, int) or isinstance(size, bool):
        raise ValueError(
            f"mlp_width cannot narrow {name}: its config has no single integer intermediate_size "
            f"(got {size!r}); drop layers or use sparsity instead"
        )
    for index, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        found: dict[str, Any] = {p: getattr(mlp, p, None) for p in _PROJECTIONS}
        if mlp is None or not all(isinstance(found[p], nn.Linear) for p in ("up_proj", "down_proj")):
            raise ValueError(
                f"mlp_width cannot narrow {name}: layer {index} has no MLP with up_proj and down_proj "
                "linear layers (fused or Conv1D projections are not supported); drop layers or use sparsity instead"
            )
        if found["gate_proj"] is not None and not isinstance(found["gate_proj"], nn.Linear):
            raise ValueError(f"mlp_width cannot narrow {name}: layer {index}'s gate_proj is not a linear layer")
        if found["up_proj"].out_features != size or found["down_proj"].in_features != size:
            raise ValueError(
                f"mlp_width cannot narrow {name}: layer {index}'s MLP is {found['up_proj'].out_features} wide, "
                f"not the config's intermediate_size {size}"
            )
    return size


def narrowed_size(width: float, intermediate_size: int) -> int:
    """The intermediate size kept for ``width`` (a fraction in (0, 1)); at least 1."""
    return max(1, round(width * intermediate_size))


@torch.no_grad()
def neuron_importance(
    model: Any, windows: TokenWindows, batch_size: int = 4, progress: bool = True
) -> list[torch.Tensor]:
    """Per layer, ``mean_t |a_ti| * ||down[:, i]||`` for every intermediate neuron i ([intermediate] each)."""
    layers: Any = decoder_layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    count = [0]

    def hook(index):
        def fn(module, args):
            a = args[0].detach().abs().flatten(0, -2).double()  # [tokens, intermediate]
            sums[index] += a.sum(0).cpu()

        return fn

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(windows.ids), batch_size), desc="neuron importance", disable=not progress):
            batch = windows.ids[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            count[0] += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    norms = [layer.mlp.down_proj.weight.detach().float().norm(dim=0).double().cpu() for layer in layers]
    return [s / max(1, count[0]) * n for s, n in zip(sums, norms)]


def narrow_mlp(
    model: Any, width: float, windows: TokenWindows, *, batch_size: int = 4, progress: bool = True
) -> WidthReport:
    """Narrow ``model``'s MLPs in place to ``round(width * intermediate_size)`` neurons each.

    The sliced projections are new tensors (weights shared with another model are not written).
    Example: ``report = narrow_mlp(pruned, 0.8, windows)``
    """
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < 1:
        raise ValueError(f"mlp width must be a fraction in (0, 1) such as 0.8, got {width!r}")
    size = check_narrowable(model)
    keep = narrowed_size(width, size)
    scores = neuron_importance(model, windows, batch_size=batch_size, progress=progress)
    layer: Any
    for layer, score in zip(decoder_layers(model), scores):
        kept = torch.topk(score, keep).indices.sort().values  # original order of the kept neurons
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            if getattr(mlp, name, None) is not None:
                setattr(mlp, name, _slice(getattr(mlp, name), kept, dim=0))
        mlp.down_proj = _slice(mlp.down_proj, kept, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    config = model.config.get_text_config()
    config.intermediate_size = keep
    logger.info("narrowed every MLP from %d to %d neurons", size, keep)
    return WidthReport(
        width=width,
        intermediate_size_before=size,
        intermediate_size_after=keep,
        importance="mean |act(gate) * up| x norm of the down_proj column, on the calibration text",
        tokens=windows.num_tokens,
    )


def _slice(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    # dim 0: keep output rows (gate/up); dim 1: keep input columns (down). The bias follows the outputs.
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias = nn.Parameter((bias.index_select(0, index.to(bias.device)) if dim == 0 else bias).clone())
    return new
