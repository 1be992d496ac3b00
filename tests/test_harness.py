"""Harness-style multiple choice: prompts as lm-evaluation-harness writes them, and scores that equal
a direct one-request-at-a-time computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hubprune.harness import EvalResult, encode_pair, evaluate_tasks, load_task, loglikelihoods


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from hubprune.loading import DEFAULT_MODEL, locate

    return AutoTokenizer.from_pretrained(locate(DEFAULT_MODEL)[0])


def test_split_sizes_match_the_harness():
    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
             "boolq": 3270, "mmlu": 14042}
    for name, size in sizes.items():
        assert len(load_task(name)) == size, name


def test_prompts_follow_the_harness_templates():
    arc = load_task("arc_easy", 1)[0]
    assert arc.contexts[0] == "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert arc.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems." and arc.gold == 0
    piqa = load_task("piqa", 1)[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert len(piqa.continuations) == 2 and piqa.gold == 0
    hs = load_task("hellaswag", 1)[0]
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.continuations[3] == " starts pulling up roofing on a roof." and hs.gold == 3
    wg = load_task("winogrande", 1)[0]
    assert wg.contexts == ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.continuations == [" always got the easier cases."] * 2 and wg.gold == 1
    bq = load_task("boolq", 1)[0]
    assert bq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert bq.continuations == [" no", " yes"] and bq.gold == 0
    mmlu = load_task("mmlu", 1)[0]
    assert mmlu.contexts[0].startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert mmlu.contexts[0].endswith("\nD. 6\nAnswer:") and mmlu.continuations == [" A", " B", " C", " D"]


def test_encode_pair_moves_trailing_space(smol_tokenizer):
    ctx, cont = encode_pair(smol_tokenizer, "Question: 2+2?\nAnswer: ", "4")
    whole = smol_tokenizer("Question: 2+2?\nAnswer: 4", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole and smol_tokenizer.decode(cont) == " 4"


def test_batched_scores_equal_one_request_at_a_time(smol_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=len(smol_tokenizer), max_position_embeddings=1024)).eval()
    requests = []
    for name in ("arc_easy", "piqa", "hellaswag", "winogrande", "boolq", "mmlu"):
        for doc in load_task(name, 2):
            requests += [encode_pair(smol_tokenizer, c, t) for c, t in zip(doc.contexts, doc.continuations)]
    batched = loglikelihoods(model, requests, batch_size=7, progress=False)
    for (ctx, cont), score in zip(requests, batched):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
        direct = sum(logprobs[len(ctx) - 1 + k, token].item() for k, token in enumerate(cont))
        assert score == pytest.approx(direct, abs=1e-3)


def test_unknown_task_and_round_trip(tmp_path, smol_tokenizer):
    with pytest.raises(ValueError, match="unknown task 'arc'; choose from arc_easy"):
        load_task("arc")
    from hubprune.harness import TaskScore

    result = EvalResult({"piqa": TaskScore("piqa", 0.6, 0.62, 0.01, 0.01, 1838, 0.5)}, perplexity=20.5, heldout="wiki")
    result.save(tmp_path / "r.json")
    assert EvalResult.load(tmp_path / "r.json") == result
    assert "piqa acc_norm (n=1838)" in result.table()
    assert result.above_chance(["piqa"]) == pytest.approx(0.12)


@pytest.mark.slow
def test_real_smollm2_is_above_chance(smollm2):
    result = evaluate_tasks(smollm2.model, smollm2.tokenizer, ["arc_easy", "piqa", "hellaswag"], limit=100, progress=False)
    assert result.tasks["arc_easy"].acc_norm > 0.35 and result.tasks["piqa"].acc_norm > 0.55
    assert result.tasks["hellaswag"].acc_norm > 0.33
    assert all(not math.isnan(s.acc_norm_stderr) for s in result.tasks.values())
