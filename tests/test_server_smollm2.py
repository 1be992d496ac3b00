"""`hubprune serve` on the real SmolLM2-135M-Instruct and a pruned copy, side by side, against BOTH engines.

The truth: the greedy answer to "What is the capital of France?" is "The capital of France is
Paris." (37 prompt tokens with the chat template's system prompt, 8 generated with <|im_end|>).
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from hubprune.server.process import ServeProcess
from test_server import engine, metric  # noqa: F401  (engine: the fixture; each test runs on both engines)

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
REMOVED = [13, 14, 15, 16, 17, 18]


@pytest.fixture(scope="module")
def pruned_dir(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-24l"
    smollm2.prune(layers=REMOVED).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(engine, pruned_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"serve-smollm2-{engine}")
    process = ServeProcess(["original=HuggingFaceTB/SmolLM2-135M-Instruct", f"pruned={pruned_dir}",
                            "--engine", engine, "--max-model-len", "512", "--max-num-seqs", "32",
                            "--log-dir", str(folder / "logs")], log_path=folder / "serve.log")
    process.start(timeout=300)
    yield process
    assert process.stop(timeout=90) == 0


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_original_answers_paris_with_exact_usage(client):
    answer = client.chat.completions.create(model="original", messages=QUESTION, temperature=0)
    assert answer.choices[0].message.content == "The capital of France is Paris."
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (37, 8)


def test_stream_concatenates_to_the_greedy_answer_for_both_models(client):
    for model in ("original", "pruned"):
        whole = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=40)
        chunks = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=40,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens
        assert whole.usage.completion_tokens >= 2


def test_two_models_answer_side_by_side(server, client):
    cards = {m.id: m.model_extra["hubprune"] for m in client.models.list().data}
    assert cards["original"]["num_layers"] == 30
    assert cards["pruned"]["num_layers"] == 24 and cards["pruned"]["removed_layers"] == REMOVED

    async def both():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
            return await asyncio.gather(*(c.chat.completions.create(model=m, messages=QUESTION, temperature=0,
                                                                    max_tokens=40) for m in ("original", "pruned")))

    original, pruned = asyncio.run(both())
    assert (original.model, pruned.model) == ("original", "pruned")
    assert "Paris" in original.choices[0].message.content
    assert pruned.choices[0].message.content and pruned.usage.prompt_tokens == 37  # same tokenizer and template


def test_64_concurrent_streams_over_two_models_finish_with_exact_usage(server, client):
    reference = {m: client.chat.completions.create(model=m, messages=QUESTION, temperature=0, max_tokens=8)
                 for m in ("original", "pruned")}

    async def stream(c, model):
        chunks = [ch async for ch in await c.chat.completions.create(
            model=model, messages=QUESTION, temperature=0, max_tokens=8, stream=True,
            stream_options={"include_usage": True})]
        return model, "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks[-1].usage

    async def load():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600,
                                      http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=64))) as c:
            return await asyncio.gather(*(stream(c, ("original", "pruned")[i % 2]) for i in range(64)))

    results = asyncio.run(load())
    assert len(results) == 64
    for model, text, usage in results:
        ref = reference[model]
        assert usage.prompt_tokens == ref.usage.prompt_tokens == 37
        assert usage.completion_tokens == ref.usage.completion_tokens
        assert text == ref.choices[0].message.content
    after = client.chat.completions.create(model="original", messages=QUESTION, temperature=0)
    assert "Paris" in after.choices[0].message.content
    metrics = httpx.get(server.url + "/metrics").text
    assert metric(metrics, "hubprune_requests_in_flight", model="pruned") == 0
    for model in ("original", "pruned"):
        assert metric(metrics, "hubprune_requests_total", model=model, endpoint="chat", status="200") >= 33
