"""`hubprune serve` on tiny random models, against BOTH engines: every route, every error, auth, limits, shutdown.

The server runs as a real `hubprune serve` process and is spoken to with the official `openai`
client (raw httpx only where a client cannot send the broken request). The vLLM variant needs
.venv-vllm (`python3 dev.py setup`) and is skipped with the reason when it is missing.
Tests run in file order per engine; the last one stops the server with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import openai
import psutil
import pytest
import yaml

from attack import tiny_models
from conftest import tiny_tokenizer, zeros_per_group
from hubprune.cli import main
from hubprune.server.config import ServeConfig
from hubprune.server.process import ServeProcess
from hubprune.server.vllm_engine import vllm_available

KEY = "sk-hubprune-test-4e1f0c"
ENGINES = ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)]


def require_vllm() -> None:
    python = ServeConfig(models=["unused"]).vllm_interpreter()
    if not vllm_available(python):
        pytest.skip(f"vLLM is not installed at {python} (run `python3 dev.py setup`, or set HUBPRUNE_VLLM_PYTHON)")


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    if request.param == "vllm":
        require_vllm()
    return request.param


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict:
    """Two random Llamas that vLLM's CPU kernels take (head dim 32), with a real BPE tokenizer and a chat template."""
    return tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(engine, tiny_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"serve-{engine}")
    config = {"engine": engine, "max_body_bytes": 65536, "log_dir": str(folder / "logs"), "models": [
        {"name": "tiny-a", "path": str(tiny_dirs["tiny-a"]), "max_model_len": 128, "max_num_seqs": 4},
        {"name": "tiny-b", "path": str(tiny_dirs["tiny-b"]), "max_model_len": 128, "max_num_seqs": 4, "max_queue": 2},
    ]}
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    process = ServeProcess(["--config", str(folder / "serve.yaml"), "-v"], env={"HUBPRUNE_API_KEY": KEY},
                           log_path=folder / "serve.log")
    process.start(timeout=300)
    yield process
    process.stop()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})})


def metric(text: str, sample: str, **labels) -> float:
    """The value of one sample of a Prometheus exposition text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == sample and s.labels == labels), 0.0)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_models_lists_both_models_with_their_engine(client, engine):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-a", "tiny-b"}
    for name, layers in (("tiny-a", 4), ("tiny-b", 2)):
        extra = models[name].model_extra
        assert extra["max_model_len"] == 128
        assert extra["hubprune"]["engine"] == engine and extra["hubprune"]["num_layers"] == layers
    assert client.models.retrieve("tiny-b").id == "tiny-b"


def test_chat_and_completions_answer_with_exact_usage(client, server):
    chat = client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Once upon"}],
                                          max_tokens=5, temperature=0)
    assert chat.model == "tiny-a" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert 1 <= chat.usage.completion_tokens <= 5 and chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    if chat.choices[0].finish_reason == "length":
        assert chat.usage.completion_tokens == 5
    prompt = "Once upon a time there was a little dog"
    done = client.completions.create(model="tiny-b", prompt=prompt, max_tokens=6, temperature=0)
    count = raw(server, "/tokenize", {"model": "tiny-b", "prompt": prompt}).json()["count"]
    assert done.usage.prompt_tokens == count > 5
    assert done.choices[0].finish_reason == "stop" or done.usage.completion_tokens == 6


def test_stream_equals_greedy_answer_and_usage_only_when_asked(client):
    messages = [{"role": "user", "content": "The cat sat on the"}]
    whole = client.chat.completions.create(model="tiny-a", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-a", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) \
        == whole.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    plain = list(client.completions.create(model="tiny-b", prompt="The dog", max_tokens=8, temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # no usage chunk unless include_usage
    again = client.completions.create(model="tiny-b", prompt="The dog", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in plain) == again.choices[0].text


def test_stop_sequence_cuts_the_text(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    text = client.chat.completions.create(model="tiny-a", messages=messages, max_tokens=24,
                                          temperature=0).choices[0].message.content
    assert len(text) >= 6, f"the tiny model said too little to test stop strings: {text!r}"
    stop = text[len(text) // 2:len(text) // 2 + 2]
    for stream in (False, True):
        answer = client.chat.completions.create(model="tiny-a", messages=messages, max_tokens=24, temperature=0,
                                                stop=[stop], stream=stream)
        if stream:
            chunks = [c for c in answer if c.choices]
            got, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert (got, finish) == (text[:text.index(stop)], "stop")


def test_seed_makes_sampling_reproducible(client):
    ask = dict(model="tiny-b", prompt="Lily and Tom", max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    first, second = (client.completions.create(**ask).choices[0].text for _ in range(2))
    assert first == second


def test_extreme_but_valid_sampling_values_answer_and_keep_the_server_serving(client, server, engine):
    # A seed at either end of torch's range, and temperature / top_p so small that dividing by them
    # overflows: answered (greedy below 1e-5, as vLLM does), never a dead worker or a 500.
    for extra in ({"seed": 2**63 - 1}, {"seed": -(2**63)}, {"temperature": 1e-300}, {"top_p": 1e-300, "seed": 3}):
        answer = client.completions.create(model="tiny-b", prompt="Lily and Tom", max_tokens=4, **extra)
        assert answer.choices[0].finish_reason in ("length", "stop"), extra
    greedy = client.completions.create(model="tiny-b", prompt="Lily and Tom", max_tokens=6, temperature=0)
    tiny = client.completions.create(model="tiny-b", prompt="Lily and Tom", max_tokens=6, temperature=1e-300)
    if engine == "transformers":  # vLLM's batched kernels are not bitwise stable on a random model's flat logits
        assert tiny.choices[0].text == greedy.choices[0].text
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_model_is_404_like_openai(client, server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    assert "tiny-a" in caught.value.body["message"]  # says what is served


def test_malformed_json_is_400(server):
    response = raw(server, "/v1/chat/completions", b'{"model": "tiny-a", "messages": [')
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"
    assert raw(server, "/v1/completions", b"[1, 2]").status_code == 400


@pytest.mark.parametrize("param,value", [("temperature", -1), ("top_p", 0), ("max_tokens", 0), ("max_tokens", "ten"),
                                         ("n", 0), ("stop", 5), ("messages", []), ("max_tokens", 1000),
                                         ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 1.5)])
def test_bad_parameter_is_400_naming_it(server, param, value):
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], param: value}
    response = raw(server, "/v1/chat/completions", body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param or param in error["message"], error


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-a", prompt="Once upon a time there was a dog. " * 40, max_tokens=4)
    assert "context" in caught.value.body["message"] and "128" in caught.value.body["message"]


def test_api_key_is_required_and_never_logged(server):
    for key, code in ((None, "missing_api_key"), ("sk-wrong", "invalid_api_key")):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(server.url + "/v1/models", headers=headers)
        assert response.status_code == 401 and error_of(response)["code"] == code
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny-a", prompt="hi", max_tokens=1)
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    logs = [server.log_path, *server.log_path.parent.glob("logs/*.log")]
    assert all(KEY not in p.read_text(errors="replace") for p in logs)


def test_body_over_the_limit_is_413(server):
    big = {"model": "tiny-a", "prompt": "x" * 100_000}
    assert error_of(raw(server, "/v1/completions", big))["code"] == "request_too_large"
    chunked = httpx.post(server.url + "/v1/completions", content=iter([b'{"prompt": "', b"y" * 90_000, b'"}']),
                         headers={"Authorization": f"Bearer {KEY}"})  # no Content-Length: counted while read
    assert chunked.status_code == 413


def test_overload_is_429_and_the_server_recovers(server, client):
    async def burst():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            async def one(i):
                try:
                    await c.completions.create(model="tiny-b", prompt=f"Story {i}", max_tokens=100, temperature=0)
                    return 200
                except openai.RateLimitError as err:
                    assert err.body["code"] == "overloaded" and "max_queue" in err.body["message"]
                    return 429
            return await asyncio.gather(*(one(i) for i in range(24)))

    codes = asyncio.run(burst())
    assert codes.count(429) >= 10 and codes.count(200) >= 2, codes
    assert client.completions.create(model="tiny-b", prompt="Again", max_tokens=3).usage.completion_tokens >= 1
    assert metric(httpx.get(server.url + "/metrics").text, "hubprune_requests_total",
                  model="tiny-b", endpoint="completions", status="429") >= 10


def test_metrics_count_requests_tokens_and_first_token_time(client, server, engine):
    before = httpx.get(server.url + "/metrics").text
    done = client.completions.create(model="tiny-a", prompt="A small red", max_tokens=7, temperature=0, stream=False)
    list(client.completions.create(model="tiny-a", prompt="A small red", max_tokens=7, temperature=0, stream=True))
    after = httpx.get(server.url + "/metrics").text
    assert "# TYPE hubprune_time_to_first_token_seconds histogram" in after
    for name, step in (("hubprune_prompt_tokens_total", done.usage.prompt_tokens),
                       ("hubprune_generation_tokens_total", done.usage.completion_tokens)):
        assert metric(after, name, model="tiny-a") - metric(before, name, model="tiny-a") == 2 * step, name
    ok = dict(model="tiny-a", endpoint="completions", status="200")
    assert metric(after, "hubprune_requests_total", **ok) - metric(before, "hubprune_requests_total", **ok) == 2
    ttft = "hubprune_time_to_first_token_seconds_count"
    assert metric(after, ttft, model="tiny-a") - metric(before, ttft, model="tiny-a") >= 1  # the streamed one
    assert metric(after, "hubprune_requests_in_flight", model="tiny-a") == 0
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(after)}  # the whole text parses
    if engine == "vllm":  # each vLLM process's own metrics pass through, labelled with the model it serves
        served = {s.labels.get("model") for f in families.values() if f.name.startswith("vllm:") for s in f.samples}
        assert {"tiny-a", "tiny-b"} <= served, sorted(families)


def test_zy_a_vllm_process_killed_mid_stream_ends_the_stream_with_an_error_event(server, engine, tiny_dirs):
    if engine != "vllm":
        pytest.skip("the embedded engine runs in the server's own process: there is no engine process to kill")
    vllm = [p for p in psutil.Process(server.process.pid).children()
            if str(tiny_dirs["tiny-b"]) in " ".join(p.cmdline())]
    assert len(vllm) == 1, vllm
    body = {"model": "tiny-b", "prompt": "Once", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        events = response.iter_bytes()
        first = next(events)
        os.killpg(vllm[0].pid, signal.SIGSTOP)  # frozen at once, then killed: the answer cannot have finished
        os.killpg(vllm[0].pid, signal.SIGKILL)
        text = first + b"".join(events)
    assert text.rstrip().endswith(b"data: [DONE]"), text[-300:]
    errors = [json.loads(e[6:]) for e in text.split(b"\n\n") if e.startswith(b'data: {"error"')]
    health = httpx.get(server.url + "/health", timeout=30)  # the router sees the dead engine (and reaps it)
    assert health.status_code == 503 and health.json()["models"] == {"tiny-a": True, "tiny-b": False}
    if not errors and b'"finish_reason":"length"' in text:  # all 120 tokens were out before SIGSTOP landed
        pytest.skip("the engine finished the answer before it could be stopped: the mid-stream path did not run")
    assert errors and errors[0]["error"]["code"] == "engine_unavailable", text[-300:]


def test_zz_sigterm_stops_the_server_and_every_engine_process(server, engine):
    children = psutil.Process(server.process.pid).children(recursive=True)
    if engine == "vllm":
        running = [c for c in children if c.status() != psutil.STATUS_ZOMBIE]  # a killed engine may await reaping
        assert sum("vllm" in " ".join(c.cmdline()) for c in running) >= 2
    assert server.stop(timeout=90) == 0
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {alive}"
    assert "stopped 2 engine(s)" in server.log_path.read_text()


def test_memory_plan_refuses_what_cannot_fit_and_says_what_would(engine, tiny_dirs, capsys):
    a, b = (str(tiny_dirs[n]) for n in ("tiny-a", "tiny-b"))
    # more copies than this machine's memory holds (a tiny model costs ~0.25 GiB embedded, ~3.5 GiB as a vLLM
    # process): refused against the real free memory, with a list of what would fit
    each = 0.25 if engine == "transformers" else 3.5
    copies = int(psutil.virtual_memory().available / 2**30 / each) + 2
    assert main(["serve", *(f"copy{i}={a}" for i in range(copies)), "--engine", engine, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "nothing was started" in err and "What would fit" in err and "fewer models: copy0, copy1" in err
    budget = "5GiB" if engine == "vllm" else "400MiB"  # room for one model, not two
    assert main(["serve", a, b, "--engine", engine, "--max-model-len", "256", "--memory-budget", budget,
                 "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"fewer models: {tiny_dirs['tiny-a'].name} (" in err and "memory_budget" in err
    if engine == "vllm":  # vLLM reserves KV cache for max_num_seqs sequences
        assert main(["serve", a, "--engine", engine, "--max-num-seqs", "10000000", "--port", "0"]) == 2
        assert "fewer concurrent sequences: max_num_seqs 1" in capsys.readouterr().err


def test_config_errors_are_refused_before_anything_starts(tmp_path, tiny_dirs, capsys):
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"path": str(tiny_dirs["tiny-a"]), "max_len": 8}]}))
    assert main(["serve", "--config", str(bad)]) == 2
    assert "unknown key 'max_len'" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"api_key": "sk-x", "models": [str(tiny_dirs["tiny-a"])]}))
    assert main(["serve", "--config", str(bad)]) == 2
    assert "HUBPRUNE_API_KEY" in capsys.readouterr().err
    assert main(["serve", str(tiny_dirs["tiny-a"]), "--engine", "vllm", "--vllm-python", str(tmp_path / "none")]) == 2
    assert "cannot import vllm" in capsys.readouterr().err
    assert main(["serve", str(tiny_dirs["tiny-a"]), "--engine", "transformers", "--quantization", "4bit",
                 "--device", "cpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_binding_beyond_this_machine_without_a_key_is_warned_about():
    from hubprune.server.launch import _loopback

    assert _loopback("127.0.0.1") and _loopback("127.3.4.5") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("::") and not _loopback("192.168.1.10")
    assert not _loopback("example.org")


@pytest.mark.vllm
def test_a_sigkilled_server_leaves_no_vllm_process_behind(tiny_dirs, tmp_path):
    require_vllm()
    server = ServeProcess([str(tiny_dirs["tiny-b"]), "--engine", "vllm", "--max-model-len", "128",
                           "--log-dir", str(tmp_path)], log_path=tmp_path / "serve.log").start(timeout=300)
    engines = psutil.Process(server.process.pid).children(recursive=True)
    assert any("vllm" in " ".join(p.cmdline()) for p in engines)
    server.process.kill()
    server.process.wait(10)
    gone, alive = psutil.wait_procs(engines, timeout=30)
    assert not alive, f"vLLM processes left after the server was SIGKILLed: {[p.cmdline()[:3] for p in alive]}"


@pytest.mark.vllm
def test_vllm_serves_pruned_models_with_the_greedy_tokens_of_transformers(tmp_path):
    """What hubprune writes loads in vLLM: a Qwen3 stack without two layers and a Mistral one cut three
    ways at once (layers, MLP width, 2:4 Wanda zeros stored dense, saved by PrunedModel.save_pretrained;
    vLLM has no sparse format left to load), the same greedy tokens as transformers."""
    require_vllm()
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

    from hubprune import LayerPruner
    from hubprune.architecture.surgery import drop_layers
    from hubprune.config import CalibrationConfig

    tokenizer = tiny_tokenizer()
    sizes = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 num_hidden_layers=6, vocab_size=300, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                 initializer_range=0.2)
    folders, prompt = {"qwen3": tmp_path / "qwen3", "mistral": tmp_path / "mistral"}, "Once upon a time"
    torch.manual_seed(0)
    drop_layers(AutoModelForCausalLM.from_config(Qwen3Config(**sizes)).eval(), [2, 3]).save_pretrained(folders["qwen3"])
    tokenizer.save_pretrained(folders["qwen3"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(MistralConfig(**sizes)).save_pretrained(tmp_path / "mistral-src")
    tokenizer.save_pretrained(tmp_path / "mistral-src")
    pruner = LayerPruner.from_pretrained(tmp_path / "mistral-src", device="cpu")
    pruner.calibrate(CalibrationConfig(n_samples=2, seq_len=16))
    pruner.prune(2, mlp_width=0.75, sparsity="2:4", progress=False).save_pretrained(folders["mistral"])
    server = ServeProcess([f"{n}={p}" for n, p in folders.items()] + ["--engine", "vllm", "--max-model-len", "128",
                                                                      "--log-dir", str(tmp_path / "logs")],
                          log_path=tmp_path / "serve.log").start(timeout=300)
    try:
        for name, folder in folders.items():
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                      do_sample=False, pad_token_id=2)[0, ids.shape[1]:].tolist()
            answer = httpx.post(server.url + "/v1/completions", timeout=120, json={
                "model": name, "prompt": ids[0].tolist(), "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_tokens_as_token_ids": True, "logprobs": 1}).json()
            got = [int(t.removeprefix("token_id:")) for t in answer["choices"][0]["logprobs"]["tokens"]]
            assert got == expected, (name, got, expected)
        cut = AutoModelForCausalLM.from_pretrained(folders["mistral"])
        assert cut.config.num_hidden_layers == 4 and cut.config.intermediate_size == 96
        assert (zeros_per_group(cut.model.layers[0].mlp.up_proj.weight) >= 2).all()  # served as 2:4 zeros
    finally:
        server.stop()
