"""The main job on a CUDA GPU: scan, prune, heal (refit + LoRA distillation), save, evaluate and serve.

Each test compares the GPU result with the same step on the CPU, so a device-only fault (a kernel
fetched from the Hub, a tensor left on the wrong device, padding that differs under CUDA) fails
here. Marked ``gpu``: skipped with the reason where no CUDA GPU is present.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from hubprune import LayerPruner
from hubprune.config import HealConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
FAST = dict(steps=6, batch_size=2, seq_len=32, learning_rate=1e-2, warmup_steps=0, distill=1.0)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits.float().cpu()


def test_scan_and_cut_on_the_gpu_match_the_cpu(tiny_model_dir):
    gpu, cpu = (LayerPruner.from_pretrained(tiny_model_dir, device=d) for d in ("cuda", "cpu"))
    assert next(gpu.model.parameters()).is_cuda
    scans = [p.scan(n_samples=8, seq_len=64, progress=False) for p in (gpu, cpu)]
    assert scans[0].choose(2) == scans[1].choose(2)
    torch.testing.assert_close(torch.tensor(scans[0].angular_last[2]), torch.tensor(scans[1].angular_last[2]),
                               atol=1e-4, rtol=1e-4)
    ids = torch.randint(3, 300, (2, 24))
    pruned = [p.prune(layers=[2, 3], progress=False) for p in (gpu, cpu)]
    torch.testing.assert_close(_logits(pruned[0].model, ids), _logits(pruned[1].model, ids), atol=2e-4, rtol=1e-4)


def test_heal_on_the_gpu_saves_a_checkpoint_the_cpu_loads_with_the_same_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pruner = LayerPruner.from_pretrained(tiny_model_dir, device="cuda")
    healed = pruner.prune(layers=[2, 3], progress=False).heal(HealConfig(**FAST), progress=False)
    assert next(healed.model.parameters()).is_cuda and healed.model.use_kernels is False
    healed.save_pretrained(tmp_path / "healed", plot=False)
    record = json.loads((tmp_path / "healed" / "hubprune.json").read_text())
    assert record["healing"]["steps"] == FAST["steps"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    ids = torch.randint(3, 300, (2, 24))
    torch.testing.assert_close(_logits(healed.model, ids), _logits(reloaded, ids), atol=2e-4, rtol=1e-4)


def test_batched_greedy_generation_on_the_gpu_equals_one_at_a_time(tiny_model_dir):
    from hubprune.generation import generate

    pruner = LayerPruner.from_pretrained(tiny_model_dir, device="cuda")
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 17)]  # different lengths: left padding matters
    together = generate(pruner.model, pruner.tokenizer, prompts, max_new_tokens=12, batch_size=3)
    alone = [generate(pruner.model, pruner.tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert [g.tokens for g in together] == [g.tokens for g in alone]


def test_evaluation_on_the_gpu_scores_as_on_the_cpu(tiny_model_dir):
    from hubprune.eval.evaluate import evaluate_model

    results = []
    for device in ("cuda", "cpu"):
        pruner = LayerPruner.from_pretrained(tiny_model_dir, device=device)
        results.append(evaluate_model(pruner.model, pruner.tokenizer, ["arc_easy"], limit=16, progress=False))
    gpu, cpu = (r.tasks["arc_easy"] for r in results)
    assert (gpu.acc, gpu.acc_norm) == (cpu.acc, cpu.acc_norm)
    assert results[0].perplexity == pytest.approx(results[1].perplexity, rel=1e-3)


def test_the_embedded_server_answers_on_the_gpu_as_on_the_cpu(tmp_path):
    from attack import KEY, start_server

    answers = {}
    for device in ("cuda", "cpu"):
        server = start_server(tmp_path / device, device=device)
        try:
            body = {"model": "tiny-a", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
            headers = {"Authorization": f"Bearer {KEY}"}
            response = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)
            assert response.status_code == 200, response.text
            answers[device] = response.json()["choices"][0]["text"]
        finally:
            server.stop()
    assert answers["cuda"] == answers["cpu"]
