"""The one-pass scan against a direct computation, and the ScanResult type."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from hubprune.calibration import TokenWindows
from hubprune.methods.scan import ScanResult, describe_layers, loss_scan, scan_model


def _direct_states(model, ids):
    """Every residual-stream state h_0..h_L, computed the plain way: hidden_states + the pre-norm output."""
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: captured.setdefault("pre_norm", args[0]))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    handle.remove()
    return [*out.hidden_states[:-1], captured["pre_norm"]]  # hidden_states[-1] is post-norm


@pytest.fixture(scope="module")
def model_and_windows():
    model = tiny_llama(num_layers=6)
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (5, 17))
    return model, TokenWindows(ids, ["x"], "random tokens")


def test_scan_matches_direct_computation(model_and_windows):
    model, windows = model_and_windows
    result = scan_model(model, windows, batch_size=2, progress=False)  # batches of 2, 2, 1
    states = [F.normalize(s.double(), dim=-1) for s in _direct_states(model, windows.ids)]
    L = 6
    assert result.num_layers == L and len(result.angular_last) == L - 1
    for n in range(1, L):
        assert len(result.angular_last[n - 1]) == L - n + 1
        for l in range(L - n + 1):
            cos = (states[l] * states[l + n]).sum(-1).clamp(-1, 1)  # [B, T]
            angle = torch.arccos(cos) / math.pi
            assert result.angular_all[n - 1][l] == pytest.approx(angle.mean().item(), abs=1e-5)
            assert result.angular_last[n - 1][l] == pytest.approx(angle[:, -1].mean().item(), abs=1e-5)
    for l in range(L):
        cos = (states[l] * states[l + 1]).sum(-1)
        assert result.block_influence[l] == pytest.approx(1 - cos.mean().item(), abs=1e-5)


def test_choose_picks_lowest_block_and_lowest_bi(model_and_windows):
    model, windows = model_and_windows
    result = scan_model(model, windows, progress=False)
    for n in (1, 2, 3):
        scores = result.angular_last[n - 1]
        start = scores.index(min(scores))
        assert result.choose(n, "angular_last") == list(range(start, start + n))
    bi = result.block_influence
    assert result.choose(2, "block_influence") == sorted(sorted(range(6), key=bi.__getitem__)[:2])
    with pytest.raises(ValueError, match="out of range"):
        result.choose(6)
    with pytest.raises(ValueError, match="unknown metric 'cosine'"):
        result.choose(2, "cosine")
    with pytest.raises(ValueError, match="no perplexity scan"):
        result.choose(2, "perplexity")


def test_loss_scan_equals_perplexity_of_each_pruned_copy(model_and_windows):
    from hubprune.architecture.surgery import drop_layers
    from hubprune.eval.perplexity import perplexity

    model, windows = model_and_windows
    scores = loss_scan(model, windows, 2, progress=False)
    assert len(scores) == 5
    assert scores[3] == pytest.approx(perplexity(drop_layers(model, [3, 4]), windows.ids))
    result = scan_model(model, windows, progress=False)
    result.perplexity[2] = scores
    start = scores.index(min(scores))
    assert result.choose(2, "perplexity") == [start, start + 1]


def test_scan_result_json_round_trip_table_and_plot(model_and_windows, tmp_path):
    model, windows = model_and_windows
    result = scan_model(model, windows, progress=False, name="tiny")
    result.perplexity[2] = loss_scan(model, windows, 2, progress=False)
    result.save(tmp_path / "scan.json")
    loaded = ScanResult.load(tmp_path / "scan.json")
    assert loaded == result
    assert json.loads((tmp_path / "scan.json").read_text())["calibration"]["tokens"] == 5 * 17
    table = result.table()
    assert len(table.splitlines()) == 2 + 5  # header, rule, one row per block size
    assert describe_layers(result.choose(3)) in table
    png = result.plot(tmp_path / "scan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.plot(tmp_path / "bi.png", metric="block_influence").stat().st_size > 1000


def test_load_rejects_other_json(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a hubprune scan result"):
        ScanResult.load(tmp_path / "x.json")
