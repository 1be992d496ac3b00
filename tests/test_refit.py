"""Closed-form refit of the layer before each gap (hubprune.heal.refit) on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from test_families import CONFIGS, build

from hubprune.architecture.families import decoder_layers, family_of, get_module
from hubprune.architecture.surgery import drop_layers
from hubprune.heal.refit import can_refit, gaps_of, refit_gaps

REFITTABLE = [name for name in CONFIGS if family_of(CONFIGS[name]()).mlp_out is not None]


pytestmark = pytest.mark.usefixtures("one_thread")


def windows(vocab: int, n: int = 12, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))


def states(model, index: int, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream entering layer ``index`` (the last hidden state's input past the end)."""
    out = model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states[index]


def test_gaps_of_groups_removed_layers_into_half_open_blocks():
    assert gaps_of([7, 3, 4], 10) == [(3, 5), (7, 8)]
    assert gaps_of([0, 1, 9], 10) == [(0, 2), (9, 10)]
    with pytest.raises(ValueError, match="out of range"):
        gaps_of([10], 10)


def test_every_family_says_whether_it_can_be_refit():
    assert set(REFITTABLE) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "gpt2"}


@pytest.mark.parametrize("family", REFITTABLE)
def test_refit_brings_the_stream_after_the_gap_closer_to_the_original(family):
    original = build(family)
    ids = windows(original.config.vocab_size)
    removed = [2, 3]
    pruned = copy.deepcopy(drop_layers(original, removed))
    before = (states(pruned, 2, ids) - states(original, 4, ids)).pow(2).mean()
    weights = {k: v.clone() for k, v in original.state_dict().items()}
    report = refit_gaps(pruned, original, removed, ids, progress=False)
    after = (states(pruned, 2, ids) - states(original, 4, ids)).pow(2).mean()
    assert after < 0.9 * before, (family, before, after)
    (gap,) = report.gaps
    assert gap["removed"] == [2, 4] and gap["refit_layer"] == 1 and gap["original_layer"] == 1
    assert gap["relative_error_after"] < gap["relative_error_before"]
    assert report.tokens == ids.numel()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in weights.items())  # the original is untouched
    assert can_refit(pruned)


def test_refit_equals_the_ridge_least_squares_solution_computed_directly():
    original = build("llama")
    ids = windows(original.config.vocab_size)
    pruned = copy.deepcopy(drop_layers(original, [3, 4]))
    layer = decoder_layers(pruned)[2]
    projection = get_module(layer, "mlp.down_proj")
    grab = {}
    handles = [projection.register_forward_hook(lambda m, a, o: grab.update(a=a[0], d=o)),
               layer.register_forward_hook(lambda m, a, o: grab.update(out=o if torch.is_tensor(o) else o[0]))]
    with torch.no_grad():
        pruned.base_model(input_ids=ids)
        target = states(original, 5, ids)
    for handle in handles:
        handle.remove()
    A = grab["a"].flatten(0, 1).double()
    R = (target - (grab["out"] - grab["d"])).flatten(0, 1).double()
    W = projection.weight.detach().double().T
    lam = 1e-2 * (A.T @ A).diagonal().mean()
    expected = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1], dtype=A.dtype), A.T @ R + lam * W)
    refit_gaps(pruned, original, [3, 4], ids, ridge=1e-2, progress=False)
    assert torch.allclose(projection.weight.detach().double().T, expected, atol=1e-4, rtol=1e-3)


def test_several_gaps_are_refit_in_order_and_a_leading_gap_is_left_alone():
    original = build("llama", num_hidden_layers=8)
    ids = windows(original.config.vocab_size)
    pruned = copy.deepcopy(drop_layers(original, [0, 3, 5, 6]))
    report = refit_gaps(pruned, original, [0, 3, 5, 6], ids, progress=False)
    assert [(g["removed"], g["refit_layer"]) for g in report.gaps] == [([3, 4], 1), ([5, 7], 2)]


def test_refusals():
    gemma = build("gemma3")
    with pytest.raises(ValueError, match="normalises its MLP output"):
        refit_gaps(drop_layers(gemma, [2]), gemma, [2], windows(gemma.config.vocab_size), progress=False)
    llama = build("llama")
    with pytest.raises(ValueError, match="leaves 4"):
        refit_gaps(drop_layers(llama, [2]), llama, [2, 3], windows(llama.config.vocab_size), progress=False)
    with pytest.raises(ValueError, match="ridge must be positive"):
        refit_gaps(drop_layers(llama, [2]), llama, [2], windows(llama.config.vocab_size), ridge=0, progress=False)
