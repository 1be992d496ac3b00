"""Closed-form repair of a pruned model: refit the layer before each gap by least squares.

Dropping the block [l, l+n) feeds layer l+n the residual stream h_l instead of h_{l+n}. The
last kept layer before the gap (original layer l-1) ends by adding its MLP output
W_out @ a to the residual stream, where a are the MLP's hidden features. Refitting W_out
so that the layer's output approximates the original's h_{l+n},

    min_X  sum_tokens || a X - (h_{l+n} - y) ||^2 + lam * ||X - W_out^T||^2

(y: the layer's output without the MLP term; lam: ``ridge`` times the mean diagonal of
a^T a), makes that layer do its own work plus a linear estimate of the removed block's.
The solution comes from one pass over the fitting text for each gap: the statistics a^T a
and a^T (h_{l+n} - y) are summed batch by batch, then one linear solve. This is ReplaceMe's
idea (Shopkhoev et al. 2025) with the correction folded into the down projection itself,
on the MLP's features rather than its output, so the model keeps its architecture and
parameter count.

Only families whose MLP output is added straight to the residual stream can be refit this
way (``Family.mlp_out``); Gemma 2/3 and OLMo 2 normalise the MLP output first and are
left as they are. Gaps are refit in order, each on the already-refit model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from hubprune.architecture.families import decoder_layers, family_of, final_hidden_hook, get_module

logger = logging.getLogger(__name__)


@dataclass
class RefitReport:
    """What the refit changed: one entry per gap, with the fit error before and after."""

    tokens: int = 0
    seconds: float = 0.0
    ridge: float = 0.0
    gaps: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the states it needs are captured."""


def gaps_of(removed: list[int], num_layers: int) -> list[tuple[int, int]]:
    """The removed layers (0-based, of the original) as half-open blocks [start, end).

    Example: ``gaps_of([3, 4, 7], 10)`` -> ``[(3, 5), (7, 8)]``
    """
    blocks: list[list[int]] = []
    for index in sorted(removed):
        if not 0 <= index < num_layers:
            raise ValueError(f"layer {index} is out of range for a model of {num_layers} layers")
        if blocks and blocks[-1][1] == index:
            blocks[-1][1] = index + 1
        else:
            blocks.append([index, index + 1])
    return [(start, end) for start, end in blocks]


def can_refit(model: nn.Module) -> bool:
    """True when the model's family adds its MLP output straight to the residual stream."""
    return family_of(model).mlp_out is not None


@torch.no_grad()
def refit_gaps(
    model: nn.Module,
    original: nn.Module,
    removed: list[int],
    windows: torch.Tensor,
    *,
    ridge: float = 1e-3,
    batch_size: int = 8,
    progress: bool = True,
) -> RefitReport:
    """Refit, in place, the MLP output projection of ``model``'s last kept layer before each gap.

    ``model`` is ``original`` without the 0-based layers ``removed`` (its own weights for the
    layers that are refit: copy them first if they are shared); ``windows`` are token ids
    [n, seq_len] of fitting text (the healing text: never evaluation text). A gap at the very
    start of the model has no layer before it and is left alone.

    Example: ``refit_gaps(pruned.model, pruner.model, [13, 14, 15], windows.ids)``
    """
    family = family_of(model)
    if family.mlp_out is None:
        raise ValueError(
            f"{family.name} normalises its MLP output before adding it to the residual stream, so the "
            "layer before a gap cannot be refit in closed form; heal it without refit (refit: false)"
        )
    if ridge <= 0:
        raise ValueError(f"ridge must be positive (it keeps the fit near the original weights), got {ridge}")
    num_layers = len(decoder_layers(original))
    gone = set(removed)
    kept = [i for i in range(num_layers) if i not in gone]
    if len(decoder_layers(model)) != len(kept):
        raise ValueError(
            f"the pruned model has {len(decoder_layers(model))} layers, but removing {sorted(removed)} "
            f"from the original's {num_layers} leaves {len(kept)}"
        )
    report = RefitReport(ridge=ridge)
    started = time.perf_counter()
    gaps = [(start, end) for start, end in gaps_of(removed, num_layers) if start > 0]
    bar = tqdm(total=2 * len(gaps) * len(windows), desc="refit", unit="window", disable=not progress or not gaps)
    for start, end in gaps:
        layer_index = kept.index(start - 1)  # the pruned model's layer that now feeds the gap
        targets = _states_entering(original, end, windows, batch_size, bar)  # [tokens, D]
        stats = _fit_statistics(model, layer_index, targets, windows, batch_size, bar)
        projection = get_module(decoder_layers(model)[layer_index], family.mlp_out)
        before, after = _solve_into(projection, *stats, ridge)
        report.gaps.append(
            {
                "removed": [start, end],
                "refit_layer": layer_index,
                "original_layer": start - 1,
                "module": family.mlp_out,
                "relative_error_before": before,
                "relative_error_after": after,
            }
        )
        logger.info(
            "refit layer %d (original %d) for the gap [%d, %d): relative error %.3f -> %.3f",
            layer_index,
            start - 1,
            start,
            end,
            before,
            after,
        )
    bar.close()
    report.tokens = int(windows.numel())
    report.seconds = round(time.perf_counter() - started, 1)
    return report


def _run_until(model: nn.Module, attach, windows: torch.Tensor, batch_size: int, bar) -> None:
    """Run the decoder stack on every batch, stopping each pass in the hook that ``attach()`` registers
    (which raises _Stop)."""
    device = next(model.parameters()).device
    handle = attach()
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model.base_model(  # type: ignore[operator]  # a transformers model
                    input_ids=windows[start : start + batch_size].to(device), use_cache=False
                )
            except _Stop:
                pass
            bar.update(len(windows[start : start + batch_size]))
    finally:
        handle.remove()


def _states_entering(original: nn.Module, index: int, windows: torch.Tensor, batch_size: int, bar) -> torch.Tensor:
    # The original's residual stream entering layer `index` (past the last layer: final_hidden_hook's).
    layers = decoder_layers(original)
    captured: list[torch.Tensor] = []

    def keep(hidden: torch.Tensor) -> None:
        captured.append(hidden.flatten(0, 1).float().cpu())
        raise _Stop

    if index < len(layers):
        attach = lambda: layers[index].register_forward_pre_hook(  # noqa: E731
            lambda module, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    else:
        attach = lambda: final_hidden_hook(original, keep)  # noqa: E731
    _run_until(original, attach, windows, batch_size, bar)
    return torch.cat(captured)


def _fit_statistics(
    model: nn.Module, layer_index: int, targets: torch.Tensor, windows: torch.Tensor, batch_size: int, bar
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Sums over tokens, in float64, of [a, 1]^T [a, 1], [a, 1]^T R and ||R||^2, with R = target - y."""
    layer = decoder_layers(model)[layer_index]
    mlp_out = family_of(model).mlp_out
    if mlp_out is None:  # can_refit says no
        raise ValueError(f"{type(model).__name__} has no MLP output projection to refit")
    projection = get_module(layer, mlp_out)
    grab: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    cursor = 0

    def capture_projection(module, args, output):
        grab["features"], grab["mlp_out"] = args[0], output

    def at_layer_output(module, args, output):
        nonlocal cursor
        out = output if torch.is_tensor(output) else output[0]
        a = grab["features"].flatten(0, 1).double().cpu()
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)  # the constant feature carries a bias
        y = out.flatten(0, 1).double().cpu() - grab["mlp_out"].flatten(0, 1).double().cpu()
        residual = targets[cursor : cursor + len(a)].double() - y  # what the MLP output should be
        cursor += len(a)
        for name, value in (("AtA", a.T @ a), ("AtR", a.T @ residual), ("norm", residual.pow(2).sum())):
            sums[name] = sums[name] + value if name in sums else value
        raise _Stop

    inner = projection.register_forward_hook(capture_projection)
    try:
        _run_until(model, lambda: layer.register_forward_hook(at_layer_output), windows, batch_size, bar)
    finally:
        inner.remove()
    return sums["AtA"], sums["AtR"], float(sums["norm"])


def _solve_into(
    projection: nn.Module, AtA: torch.Tensor, AtR: torch.Tensor, norm: float, ridge: float
) -> tuple[float, float]:
    """Solve the ridge problem toward the current weights, write the solution into ``projection``,
    and return the relative fit error ||R - [a, 1] X||^2 / ||R||^2 before and after."""
    weight, bias = _as_in_out(projection)  # [in, out], [out] (zeros where there is no bias)
    current = torch.cat([weight, bias[None]]).double()  # [in + 1, out]
    penalty = torch.full((AtA.shape[0],), float(ridge * AtA.diagonal()[:-1].mean()), dtype=torch.float64)
    penalty[-1] = 0.0 if projection_has_bias(projection) else 1e12  # no bias to fit where the layer has none
    solution = torch.linalg.solve(AtA + torch.diag(penalty), AtR + penalty[:, None] * current)
    if not projection_has_bias(projection):
        solution[-1] = 0.0

    def error(x: torch.Tensor) -> float:  # ||R - A x||^2 = ||R||^2 - 2 tr(x^T A^T R) + tr(x^T A^T A x)
        return (norm - 2 * float((x * AtR).sum()) + float((x * (AtA @ x)).sum())) / norm

    _write_in_out(projection, solution[:-1], solution[-1])
    return error(current), error(solution)


def projection_has_bias(projection: nn.Module) -> bool:
    return getattr(projection, "bias", None) is not None


def _as_in_out(projection: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    weight = _tensor(projection, "weight").detach().float().cpu()
    weight = weight if _is_conv1d(projection) else weight.T
    bias = (
        _tensor(projection, "bias").detach().float().cpu()
        if projection_has_bias(projection)
        else torch.zeros(weight.shape[1])
    )
    return weight, bias


def _write_in_out(projection: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    target = _tensor(projection, "weight")
    new = weight if _is_conv1d(projection) else weight.T
    projection.weight = nn.Parameter(
        new.to(target.dtype).to(target.device).contiguous(), requires_grad=target.requires_grad
    )
    if projection_has_bias(projection):
        projection.bias = nn.Parameter(
            bias.to(target.dtype).to(target.device), requires_grad=_tensor(projection, "bias").requires_grad
        )


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``module.weight`` or ``module.bias`` as a tensor (nn.Module's attribute lookup says Tensor or Module)."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is a {type(value).__name__}, not a tensor")
    return value


def _is_conv1d(projection: nn.Module) -> bool:
    return type(projection).__name__ == "Conv1D"
