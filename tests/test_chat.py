"""Chat fidelity (hubprune.eval.chat) and chat healing (hubprune.heal.data), both over hubprune.generation: tiny
models with a chat template, and the real SmolLM2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from hubprune.config import ChatDataConfig, HealConfig
from hubprune.eval.chat import chat_fidelity, eval_prompts, loops, reference_answers
from hubprune.generation import generate, model_fingerprint, render
from hubprune.heal.data import chat_windows, magpie_prompts, self_chat, student_chat, user_prefix

pytestmark = pytest.mark.usefixtures("one_thread")

# A ChatML-like template over the tiny tokenizer's own special tokens: </s> ends a turn.
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def prompt_file(tmp_path, n=12):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Tell me a short story about a cat called number {i}." for i in range(n)))
    return path


def test_loops_counts_a_word_four_gram_three_times():
    assert loops("a luxury that requires a lot of effort, " * 3)
    assert not loops("a luxury that requires a lot of effort, " * 2)
    assert not loops("The capital of France is Paris.")


def test_eval_prompts_are_mt_bench_then_evenly_spaced_natural_questions():
    prompts, source = eval_prompts(128)
    assert source == "80 MT-bench first turns and 48 Natural Questions"
    assert len(prompts) == len(set(prompts)) == 128
    assert prompts[0].startswith("Compose an engaging travel blog post")
    assert all(p.endswith("?") for p in prompts[80:])
    assert eval_prompts(128)[0] == prompts  # fixed, so runs compare
    assert eval_prompts(8)[0] == prompts[:8]
    with pytest.raises(ValueError, match="positive"):
        eval_prompts(0)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(chat_tokenizer):
    model = tiny_llama(seed=3)
    inputs = render(chat_tokenizer, ["Hi", "Tell me about the moon and the stars tonight", "Why?"], chat=True)
    batched = generate(model, chat_tokenizer, inputs, max_new_tokens=12, batch_size=3)
    for ids, out in zip(inputs, batched):
        alone = generate(model, chat_tokenizer, [ids], max_new_tokens=12, batch_size=1)[0]
        assert out.tokens == alone.tokens
        reference = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=2,
                                   eos_token_id=2)[0, len(ids):].tolist()
        assert out.tokens == reference[: len(out.tokens)]
    sampled = generate(model, chat_tokenizer, inputs, max_new_tokens=12, temperature=1.0, seed=5)
    assert sampled == generate(model, chat_tokenizer, inputs, max_new_tokens=12, temperature=1.0, seed=5)


def test_chat_windows_mark_exactly_the_answer_tokens(chat_tokenizer):
    conversations = [{"prompt": f"question {i}", "answer": f"answer number {i} is here"} for i in range(30)]
    windows = chat_windows(chat_tokenizer, conversations, n_samples=4, seq_len=32)
    assert windows.ids.shape == windows.loss_mask.shape == (4, 32)
    assert (windows.ids[:, 0] == chat_tokenizer.bos_token_id).all() and not windows.loss_mask[:, 0].any()
    learnt = chat_tokenizer.decode(windows.ids[windows.loss_mask])
    assert "answer number 0 is here" in learnt and "question" not in learnt and "assistant" not in learnt
    assert learnt.count("</s>") >= 2  # each answer's end-of-turn token is learnt too
    with pytest.raises(ValueError, match="less than one window"):
        chat_windows(chat_tokenizer, conversations[:1], n_samples=4, seq_len=512)


def test_fidelity_of_a_model_to_itself_is_perfect_and_to_another_is_not(chat_tokenizer):
    model, other = tiny_llama(seed=0), tiny_llama(seed=1)
    prompts = ["Hello there", "What is two plus two?", "Name a colour", "Tell me a story"]
    same = chat_fidelity(model, model, chat_tokenizer, prompts=prompts, max_new_tokens=16, progress=False)
    assert same.mode == "chat" and same.prompts == 4
    assert same.top1_agreement == 1.0 and abs(same.kl) < 1e-4
    assert (same.loop_rate, same.eos_rate) == (same.original_loop_rate, same.original_eos_rate)
    assert same.answer_tokens > 0
    apart = chat_fidelity(other, model, chat_tokenizer, prompts=prompts, max_new_tokens=16, progress=False)
    assert apart.top1_agreement < 0.9 and apart.kl > 0.01
    assert "top-1 agreement" in apart.table()
    json.dumps(apart.to_dict())


def test_fidelity_refuses_chat_without_a_template_and_names_the_fallback():
    tok = tiny_tokenizer()
    model = tiny_llama()
    with pytest.raises(ValueError, match="--continuations"):
        chat_fidelity(model, model, tok, prompts=["hi"], chat=True, progress=False)
    result = chat_fidelity(model, model, tok, prompts=["Once upon a time"], max_new_tokens=8, progress=False)
    assert result.mode == "continuation" and result.top1_agreement == 1.0


def test_magpie_questions_come_from_the_user_turn_prefix(chat_tokenizer):
    assert user_prefix(chat_tokenizer) == "<s>user: "
    model = tiny_llama(seed=2)
    config = ChatDataConfig(max_question_tokens=24, question_temperature=1.0, batch_size=16)
    questions = magpie_prompts(model, chat_tokenizer, 4, config, progress=False)
    assert 0 < len(questions) <= 4 and len(set(questions)) == len(questions)
    assert all(10 <= len(q) <= 600 for q in questions)


def test_self_chat_is_cached_and_a_rerun_reuses_it(chat_tokenizer, cache, tmp_path, monkeypatch):
    model = tiny_llama(seed=2)
    config = ChatDataConfig(prompts=str(prompt_file(tmp_path)), max_new_tokens=8, batch_size=8)
    first = self_chat(model, chat_tokenizer, config, count=6, progress=False)
    assert len(first) == 6 and first[0]["prompt"].startswith("Tell me a short story")
    assert len(list((cache / "chat-data").glob("*.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a cached set must not be generated again")

    monkeypatch.setattr("hubprune.heal.data.generate", refuse)
    assert self_chat(model, chat_tokenizer, config, count=6, progress=False) == first


def test_prompts_that_overlap_the_evaluation_prompts_are_refused(chat_tokenizer, cache, tmp_path):
    held_out = eval_prompts(3)[0]
    path = tmp_path / "leaky.txt"
    path.write_text("Write me a poem.\n" + held_out[1] + "\n")
    with pytest.raises(ValueError, match="overlap"):
        self_chat(tiny_llama(), chat_tokenizer, ChatDataConfig(prompts=str(path)), count=2, progress=False)
    with pytest.raises(FileNotFoundError, match="one prompt a line"):
        self_chat(tiny_llama(), chat_tokenizer, ChatDataConfig(prompts=str(tmp_path / "nope.txt")), count=2)


def test_chat_healing_learns_only_answer_tokens_and_records_it(chat_tokenizer, cache, tmp_path):
    from hubprune.heal.data import healing_text
    from hubprune.heal.lora import heal_model

    original = tiny_llama(num_layers=6, seed=4)
    student = tiny_llama(num_layers=6, seed=4)
    del student.model.layers[3]
    student.config.num_hidden_layers = 5
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    config = HealConfig(steps=3, batch_size=2, seq_len=32, distill=1.0, warmup_steps=0, refit=False,
                        chat=ChatDataConfig(prompts=str(prompt_file(tmp_path)), conversations=12, max_new_tokens=16))
    assert healing_text(config, chat_tokenizer, None, original)[0] == "chat"
    assert healing_text(config, tiny_tokenizer(), None, original) == ("prose", "the tokenizer has no chat template")
    healed, report = heal_model(student, chat_tokenizer, config, teacher=original, progress=False)
    assert report.data["text"] == "chat" and report.data["source"] == "12 conversations written by the original"
    assert report.final_loss == report.final_loss  # not NaN

    mixed, report = heal_model(tiny_llama(num_layers=6, seed=4), chat_tokenizer,
                               HealConfig(steps=2, batch_size=2, seq_len=32, distill=1.0, refit=False, mix=0.5,
                                          chat=config.chat), teacher=original, progress=False)
    assert "mixed with 2 windows" in report.data["source"]


def test_chat_healing_refusals(chat_tokenizer, tmp_path):
    from hubprune.heal.data import healing_text

    original = tiny_llama()
    with pytest.raises(ValueError, match="heal.text prose"):
        healing_text(HealConfig(text="chat"), tiny_tokenizer(), None, original)
    with pytest.raises(ValueError, match="not at hand"):
        healing_text(HealConfig(text="chat"), chat_tokenizer, None, None)
    with pytest.raises(ValueError, match="heal.mix"):
        healing_text(HealConfig(text="chat"), chat_tokenizer, ["some prose"], original)
    assert healing_text(HealConfig(), chat_tokenizer, ["some prose"], original)[0] == "prose"
    assert healing_text(HealConfig(text="chat", mix=0.3), chat_tokenizer, ["some prose"], original)[0] == "chat"
    for bad in ({"mix": 1.0}, {"mix": -0.1}, {"text": "poetry"}, {"precision": "float16"}):
        with pytest.raises(ValueError, match="heal\\."):
            HealConfig(**bad)
    for bad in ({"conversations": 0}, {"temperature": 0}, {"top_p": 1.5}, {"prompts": ""}):
        with pytest.raises(ValueError, match="heal.chat"):
            ChatDataConfig(**bad)


def test_the_loss_mask_limits_both_terms_to_the_learnt_tokens():
    from hubprune.heal.lora import healing_loss

    model, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    batch = torch.randint(3, 300, (2, 16))
    learn = torch.zeros(2, 16, dtype=torch.bool)
    learn[:, 10:] = True
    logits = model(input_ids=batch).logits
    expected = torch.nn.functional.cross_entropy(logits[:, 9:15].flatten(0, 1), batch[:, 10:].flatten())
    lm = healing_loss(model, teacher, batch, HealConfig(distill=0.0), learn)
    assert torch.allclose(lm, expected, atol=1e-5)
    everything = healing_loss(model, teacher, batch, HealConfig(distill=0.0), None)
    assert torch.allclose(everything, torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                                         batch[:, 1:].flatten()), atol=1e-5)
    target = teacher(input_ids=batch).logits
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)[:, 9:15].mean()
    assert torch.allclose(healing_loss(model, teacher, batch, HealConfig(distill=1.0), learn), kl, atol=1e-5)
    nothing = healing_loss(model, teacher, batch, HealConfig(distill=0.5), torch.zeros_like(learn))
    assert nothing.item() == 0.0


def test_the_divergences_are_the_named_ones_and_train_the_student():
    from hubprune.heal.lora import divergence, healing_loss

    torch.manual_seed(0)
    teacher_logits, logits = torch.randn(5, 11) * 3, (torch.randn(5, 11) * 3).requires_grad_()
    p, q = teacher_logits.softmax(-1), logits.softmax(-1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731
    m = (p + q) / 2
    assert torch.allclose(divergence(teacher_logits, logits, "forward"), kl(p, q), atol=1e-5)
    assert torch.allclose(divergence(teacher_logits, logits, "reverse"), kl(q, p), atol=1e-5)
    jsd = divergence(teacher_logits, logits, "jsd")
    assert torch.allclose(jsd, (kl(p, m) + kl(q, m)) / 2, atol=1e-5)
    assert 0 < jsd < 5 * math.log(2)  # at most log 2 a row
    for kind in ("forward", "reverse", "jsd"):
        assert divergence(teacher_logits, teacher_logits.clone(), kind).abs() < 1e-5
        (grad,) = torch.autograd.grad(divergence(teacher_logits, logits, kind), logits)
        assert grad.abs().sum() > 0  # the student's side carries the gradient, whichever term
    with pytest.raises(ValueError, match="heal.divergence"):
        HealConfig(divergence="kl")

    model, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    batch = torch.randint(3, 300, (2, 16))
    learn = torch.zeros(2, 16, dtype=torch.bool)
    learn[:, 10:] = True
    student, target = model(input_ids=batch).logits[:, 9:15].flatten(0, 1), teacher(input_ids=batch).logits[:, 9:15]
    reverse = healing_loss(model, teacher, batch, HealConfig(distill=1.0, divergence="reverse"), learn)
    assert torch.allclose(reverse, divergence(target.flatten(0, 1), student, "reverse") / 12, atol=1e-5)


def test_scored_logits_gather_before_the_head_and_give_the_same_loss_and_gradient():
    from hubprune.eval.scoring import scored_logits

    model = tiny_llama(seed=0)
    batch = torch.randint(3, 300, (2, 16))
    scored = torch.rand(2, 16) > 0.5
    full = model(input_ids=batch).logits
    full[scored].sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    picked = scored_logits(model, scored, input_ids=batch)
    assert picked.shape == (int(scored.sum()), full.size(-1))
    torch.testing.assert_close(picked, full[scored].detach())
    picked.sum().backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is removed
    model.get_output_embeddings = lambda: torch.nn.Identity()  # a model whose forward bypasses its head
    torch.testing.assert_close(scored_logits(model, scored, input_ids=batch), full[scored].detach())


def test_eval_chat_on_a_model_without_a_chat_template_names_the_fallback(tiny_model_dir, tmp_path, capsys):
    from hubprune.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dir), "--layers", "2", "--out", str(out), "-q"]) == 0
    assert main(["eval", str(out), "--chat", "--tasks", "", "-q"]) == 2
    assert "--continuations" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--chat", "-q"]) == 2
    assert "hubprune.json" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_writes_its_own_questions_and_answers_itself_faithfully(smollm2, cache):
    model, tok = smollm2.model, smollm2.tokenizer
    questions = magpie_prompts(model, tok, 4, ChatDataConfig(batch_size=4, max_question_tokens=48),
                               progress=False)
    assert len(questions) == 4 and all(q.strip() for q in questions)
    answer = generate(model, tok, render(tok, ["What is the capital of France?"], chat=True),
                      max_new_tokens=16)[0]
    assert "Paris" in tok.decode(answer.tokens) and answer.finished
    same = chat_fidelity(model, model, tok, n_prompts=3, max_new_tokens=24, progress=False)
    assert same.top1_agreement == 1.0 and same.kl < 1e-4 and same.source == "3 MT-bench first turns"


def test_student_answers_add_the_pruned_models_own_greedy_answers(chat_tokenizer, cache, tmp_path):
    from hubprune.heal.lora import heal_model

    original, student = tiny_llama(num_layers=6, seed=4), tiny_llama(num_layers=6, seed=5)
    chat_config = ChatDataConfig(prompts=str(prompt_file(tmp_path)), conversations=8, max_new_tokens=12,
                                 student_answers=4)
    own = student_chat(student, chat_tokenizer, [{"prompt": "Hello there"}], chat_config, progress=False)
    expected = generate(student, chat_tokenizer, render(chat_tokenizer, ["Hello there"], True),
                        max_new_tokens=12)[0]
    assert own[0]["answer"] == chat_tokenizer.decode(expected.tokens, skip_special_tokens=True).strip()
    _, report = heal_model(student, chat_tokenizer, HealConfig(steps=2, batch_size=2, seq_len=32, distill=1.0,
                                                               refit=False, chat=chat_config),
                           teacher=original, progress=False)
    assert report.data["source"] == ("8 conversations written by the original and 4 of its questions answered "
                                     "by the pruned model")
    with pytest.raises(ValueError, match="student_answers"):
        ChatDataConfig(conversations=4, student_answers=5)


def test_on_policy_steps_are_spread_evenly_and_counted():
    from hubprune.heal.onpolicy import on_policy_count, on_policy_step

    assert [s for s in range(10) if on_policy_step(s, 0.5)] == [1, 3, 5, 7, 9]
    assert [s for s in range(10) if on_policy_step(s, 0.3)] == [3, 6, 9]
    assert not any(on_policy_step(s, 0.0) for s in range(10)) and all(on_policy_step(s, 1.0) for s in range(10))
    for share in (0.0, 0.3, 0.5, 1.0):
        assert [on_policy_count(s, share) for s in range(11)] == [
            sum(on_policy_step(k, share) for k in range(s)) for s in range(11)
        ]


def test_an_on_policy_batch_is_the_students_own_answer_after_each_question(chat_tokenizer):
    from hubprune.heal.onpolicy import on_policy_batch, on_policy_questions

    student = tiny_llama(num_layers=4, seed=5).train()
    student.config.use_cache = False
    prompts = ["Hello there", "Why is the sky blue?", "Tell me about cats, please.", "A question far too long. " * 9]
    near_greedy = ChatDataConfig(temperature=1e-5)  # sampled as the original's answers are; here all but greedy
    config = HealConfig(batch_size=4, seq_len=128, on_policy=0.5, on_policy_tokens=10, chat=near_greedy)
    questions = on_policy_questions(chat_tokenizer, prompts, config.seq_len)
    assert len(questions) == 3  # the long one leaves no room for an answer
    ids, learn = on_policy_batch(student, chat_tokenizer, questions, 0, config)
    assert student.training and student.config.use_cache is False  # put back as it was
    rendered = {tuple(r): p for r, p in zip(render(chat_tokenizer, prompts, chat=True), prompts)}
    pad = chat_tokenizer.pad_token_id if chat_tokenizer.pad_token_id is not None else chat_tokenizer.eos_token_id
    for row, mask in zip(ids.tolist(), learn.tolist()):
        start, end = mask.index(True), len(mask) - mask[::-1].index(True)
        assert all(mask[start:end]) and 1 <= end - start <= 10
        assert tuple(row[:start]) in rendered  # the question, through the template
        assert all(t == pad for t in row[end:])  # right padding, never learnt
        greedy = generate(student, chat_tokenizer, [row[:start]], max_new_tokens=10)[0].tokens
        assert row[start:end] == greedy  # the student's own answer, as it stands now
    assert on_policy_batch(student, chat_tokenizer, questions, 0, config)[0].equal(ids)  # seeded: resumable
    assert not on_policy_batch(student, chat_tokenizer, questions, 1, config)[0].equal(ids)
    with pytest.raises(ValueError, match="heal.seq_len"):
        on_policy_questions(chat_tokenizer, prompts, 16)


def test_on_policy_healing_answers_on_the_right_steps_and_records_them(chat_tokenizer, cache, tmp_path, monkeypatch):
    import hubprune.heal.lora as lora
    from hubprune.heal.data import healing_windows

    seen = []
    real = lora.on_policy_batch

    def spy(model, tokenizer, questions, index, config):
        seen.append((index, model.training))
        return real(model, tokenizer, questions, index, config)

    monkeypatch.setattr(lora, "on_policy_batch", spy)
    original = tiny_llama(num_layers=6, seed=4)
    chat = ChatDataConfig(prompts=str(prompt_file(tmp_path)), conversations=8, max_new_tokens=12)
    config = HealConfig(steps=4, batch_size=2, seq_len=128, distill=1.0, refit=False, on_policy=0.5,
                        on_policy_tokens=8, chat=chat)
    _, report = lora.heal_model(tiny_llama(num_layers=6, seed=5), chat_tokenizer, config, teacher=original,
                                progress=False)
    assert seen == [(0, True), (1, True)]  # steps 1 and 3, each on the next questions
    assert report.data["on_policy_steps"] == 2 and report.final_loss == report.final_loss
    with pytest.raises(ValueError, match="--on-policy 0"):
        healing_windows(tiny_tokenizer(), config, None, 1, original, progress=False)
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="heal.on_policy"):
            HealConfig(on_policy=bad)


def test_the_originals_answers_are_cached_by_its_weights(chat_tokenizer, cache, monkeypatch):
    model = tiny_llama(seed=7)
    first = reference_answers(model, chat_tokenizer, prompts=["Hello there", "Why?"], max_new_tokens=8,
                              progress=False)
    changed = tiny_llama(seed=7)
    with torch.no_grad():
        changed.model.layers[2].mlp.down_proj.weight.mul_(1.01)  # the embeddings and config are the same
    assert model_fingerprint(changed) != model_fingerprint(model)
    assert model_fingerprint(tiny_llama(seed=7)) == model_fingerprint(model)

    def refuse(*args, **kwargs):
        raise AssertionError("cached greedy answers must not be generated again")

    monkeypatch.setattr("hubprune.eval.chat.generate", refuse)
    again = reference_answers(model, chat_tokenizer, prompts=["Hello there", "Why?"], max_new_tokens=8,
                              progress=False)
    assert again.answers == first.answers and again.inputs == first.inputs


def test_eval_chat_writes_the_record_and_the_card(chat_tokenizer, cache, tmp_path, capsys):
    from hubprune.cli import main

    source = tmp_path / "chatty"
    tiny_llama(seed=9).save_pretrained(source)
    chat_tokenizer.save_pretrained(source)
    out = tmp_path / "chatty-pruned"
    assert main(["prune", str(source), "--layers", "2,3", "--out", str(out), "-q"]) == 0
    assert main(["eval", str(out), "--chat", "--tasks", "", "--chat-prompts", "4", "--max-new-tokens", "8",
                 "-q"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement with the original" in printed and "4 MT-bench first turns" in printed
    record = json.loads((out / "hubprune.json").read_text())
    measured = record["evaluation"]["chat"]
    assert measured["prompts"] == 4 and 0 <= measured["top1_agreement"] <= 1 and measured["kl"] >= 0
    assert record["evaluation"]["command"] == (f"hubprune eval {out} --chat --tasks '' --chat-prompts 4 "
                                               "--max-new-tokens 8 -q")
    card = (out / "README.md").read_text()
    assert f"| chat answers: top-1 agreement with the original | 1 | {measured['top1_agreement']:.3f} |" in card
