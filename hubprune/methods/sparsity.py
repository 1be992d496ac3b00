"""Zero weights of the decoder layers' linear projections: unstructured or N:M, by magnitude or Wanda.

Scores, for a weight matrix ``W`` ([out, in]) and calibration inputs ``X`` ([tokens, in]):

- ``magnitude``: ``|W_ij|``; unstructured sparsity ``s`` zeroes the ``round(s * out * in)``
  smallest of the whole matrix;
- ``wanda`` (Sun et al. 2023): ``|W_ij| * ||X_:j||_2``; unstructured sparsity zeroes the
  ``round(s * in)`` lowest scores of each output row. As in the paper's code, layers are pruned
  one after another: ``X`` is what each projection sees when the calibration text has passed
  through the layers sparsified before it (``wanda_masks``); the projections of one layer are
  scored together, on that layer's dense input.

``N:M`` (e.g. ``2:4``) keeps the N highest scores in every group of M consecutive inputs of a
row, the pattern NVIDIA's sparse tensor cores run. Embeddings, the LM head and routers are
never touched. The weights stay dense tensors with zeros in place: the mask is the set of
zero weights, recorded in ``hubprune.json`` (counts per projection and a sha256 of the mask),
and healing keeps it (``apply_masks`` after the LoRA merge).

Example (recipe)::

    prune:
      sparsity: "2:4"        # quoted: YAML 1.1 reads a bare 2:4 as the number 124
      sparsity_method: wanda
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hubprune.architecture.families import decoder_layers, family_of, get_module
from hubprune.calibration import TokenWindows
from hubprune.config import SPARSITY_METHODS, Sparsity, parse_sparsity

logger = logging.getLogger(__name__)

FORMAT = "dense: zeros stored in place (vLLM has no sparse format left to load)"


def target_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The linear projections of the decoder layers that sparsity zeroes, by full module name."""
    family = family_of(model)
    found = {}
    for index, layer in enumerate(decoder_layers(model)):
        for path, module in layer.named_modules():
            linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
            if linear and path.rpartition(".")[2] in family.lora_targets:
                found[f"{family.layers}.{index}.{path}"] = module
    if not found:
        raise ValueError(f"no linear projections found in the decoder layers of {type(model).__name__}")
    return found


def _rows(module: Any) -> torch.Tensor:
    # The weight as [out, in] (GPT-2's Conv1D stores [in, out]).
    w = module.weight.detach()
    return w.t() if type(module).__name__ == "Conv1D" else w


def _square_sums(modules: dict[str, nn.Module], squares: dict[str, torch.Tensor]) -> list:
    """Hooks adding the squares of each named module's inputs, per input feature, into ``squares``."""

    def hook(name):
        def fn(module, args):
            x = args[0].detach().flatten(0, -2).double()  # [tokens, in]
            squares[name] = squares.get(name, 0) + (x * x).sum(0).cpu()

        return fn

    return [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]


@dataclass
class LayerCalls:
    """One calibration batch, ready to be run layer by layer: the first decoder layer's hidden
    states, and per layer the other arguments the model called it with."""

    hidden: torch.Tensor
    arguments: list[tuple[tuple, dict]] = field(default_factory=list)

    def run(self, layer: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.arguments[index]
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layer_calls(
    model: nn.Module, windows: TokenWindows, batch_size: int = 4, progress: bool = True
) -> list[LayerCalls]:
    """One dense pass over ``windows`` that records how each layer is called (masks, rotary
    embeddings; a sliding-window layer gets its own mask), so that each can be run again on its own."""
    batches: list[LayerCalls] = []

    def capture(index):
        def fn(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            for cache in ("past_key_values", "past_key_value"):  # use_cache=False: nothing to carry
                kwargs.pop(cache, None)
            if index == 0:
                batches.append(LayerCalls(hidden.detach()))
            batches[-1].arguments.append((args[1:], {**kwargs, "use_cache": False}))

        return fn

    layers = decoder_layers(model)
    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(windows.ids), batch_size), desc="layer inputs", disable=not progress):
            # The decoder stack alone (as the refit's passes): the LM head's logits are not needed here.
            model.base_model(  # type: ignore[operator]  # a transformers model
                input_ids=windows.ids[start : start + batch_size].to(device), use_cache=False
            )
    finally:
        for handle in handles:
            handle.remove()
    return batches


@torch.no_grad()
def wanda_masks(
    model: nn.Module,
    modules: dict[str, nn.Module],
    target: Sparsity,
    windows: TokenWindows,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Wanda layer by layer (the paper's ``prune_wanda``): score one layer's projections on its
    inputs, zero them in place, and run the layer again so that the next layer reads the sparse
    layer's outputs. Returns the masks (True = kept), already applied."""
    batches = layer_calls(model, windows, batch_size, progress)
    hidden = [batch.hidden for batch in batches]
    prefix = family_of(model).layers
    masks: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(tqdm(decoder_layers(model), desc=f"wanda {target}", disable=not progress)):
        own = {n: m for n, m in modules.items() if n.startswith(f"{prefix}.{index}.")}
        squares: dict[str, torch.Tensor] = {}
        handles = _square_sums(own, squares)
        try:
            for batch, h in zip(batches, hidden):
                batch.run(layer, index, h)
        finally:
            for handle in handles:
                handle.remove()
        for name, module in own.items():
            w = _rows(module).float()
            mask = keep_mask(w.abs() * squares[name].sqrt().float().to(w.device), target, per_row=True)
            masks[name] = mask.t() if type(module).__name__ == "Conv1D" else mask
        apply_masks(model, {n: masks[n] for n in own})
        hidden = [batch.run(layer, index, h) for batch, h in zip(batches, hidden)]  # the next layer's inputs
    return masks


def keep_mask(score: torch.Tensor, target: Sparsity, per_row: bool) -> torch.Tensor:
    """Boolean mask ([out, in], True = kept) zeroing the lowest scores: per N:M group, per row, or per matrix."""
    rows, cols = score.shape
    mask = torch.ones_like(score, dtype=torch.bool)
    if target.m and target.n is not None:
        if cols % target.m:
            raise ValueError(f"{target.pattern} sparsity needs input sizes divisible by {target.m}, got {cols}")
        groups = score.reshape(rows, cols // target.m, target.m)
        low = torch.topk(groups, target.m - target.n, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // target.m, target.m).scatter_(-1, low, False).reshape(rows, cols)
    if per_row:
        k = round(target.fraction * cols)
        if k:
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
        return mask
    k = round(target.fraction * score.numel())
    if k:
        mask.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = False
    return mask


def sparsify(
    model: nn.Module,
    target: Sparsity | float | str,
    method: str = "wanda",
    windows: TokenWindows | None = None,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Zero ``target`` of every decoder projection's weights in place (new tensors); the report for the record.

    Example: ``report = sparsify(pruned, "2:4", "wanda", windows)``
    """
    target = target if isinstance(target, Sparsity) else parse_sparsity(target)
    if method not in SPARSITY_METHODS:
        raise ValueError(f"sparsity method {method!r} is unknown; choose one of {', '.join(SPARSITY_METHODS)}")
    modules = target_modules(model)
    if method == "wanda":
        if windows is None:
            raise ValueError("wanda sparsity needs calibration windows (its score weighs |W| by the input norms)")
        masks = wanda_masks(model, modules, target, windows, batch_size, progress)  # applied layer by layer
    else:
        masks = {}
        for name, module in tqdm(modules.items(), desc=f"{method} {target}", disable=not progress):
            mask = keep_mask(_rows(module).float().abs(), target, per_row=False)
            masks[name] = mask.t() if type(module).__name__ == "Conv1D" else mask
        apply_masks(model, masks)
    report = {"target": str(target), "pattern": target.pattern, "method": method, **mask_summary(masks)}
    report["format"] = FORMAT
    if windows is not None and method == "wanda":
        report["tokens"] = windows.num_tokens
    share, count = 100 * report["sparsity"], report["weights"]
    logger.info("zeroed %.1f%% of %d decoder weights (%s, %s)", share, count, target, method)
    return report


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero each named module's weight where its mask is False (a new tensor: shared weights are not written)."""
    for name, mask in masks.items():
        module: Any = get_module(model, name)
        w = module.weight
        module.weight = nn.Parameter(w.detach() * mask.to(w.device, w.dtype), requires_grad=w.requires_grad)


def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks of a sparse model, read back from its zero weights (True = kept)."""
    modules: dict[str, Any] = target_modules(model)
    return {name: module.weight.detach() != 0 for name, module in modules.items()}


def mask_summary(masks: dict[str, torch.Tensor]) -> dict:
    """Zeros per projection kind (q_proj, ...) over all layers, the total, and a sha256 of the masks."""
    digest, zeros, total = hashlib.sha256(), 0, 0
    per_kind: dict[str, dict[str, Any]] = {}
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].cpu().numpy().tobytes())
    for name, mask in masks.items():  # in the model's order: q_proj, k_proj, ... per layer
        mask = mask.cpu()
        kind = name.rpartition(".")[2]
        z, n = int((~mask).sum()), mask.numel()
        entry = per_kind.setdefault(kind, {"zeros": 0, "weights": 0, "modules": 0})
        entry["zeros"] += z
        entry["weights"] += n
        entry["modules"] += 1
        zeros, total = zeros + z, total + n
    for entry in per_kind.values():
        entry["sparsity"] = round(entry["zeros"] / entry["weights"], 6)
    return {
        "sparsity": round(zeros / max(1, total), 6),
        "zeros": zeros,
        "weights": total,
        "projections": per_kind,
        "mask_sha256": digest.hexdigest(),
    }
