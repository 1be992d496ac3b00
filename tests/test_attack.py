"""The attack suite (tests/attack.py) at CI size, and the faults it does not generate: long prompts,
clients that leave, SIGTERM with requests in flight, a SIGKILLed compare app.

`python3 dev.py attack` runs the whole suite (10,000 requests) and prints its report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from attack import KEY, Attacker, attack, start_server, tiny_models
from hubprune.server.process import free_port

HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("attack"), max_body_bytes=4 * 2**20)
    yield server
    assert server.stop() == 0


def test_generated_bad_requests_get_4xx_and_leave_the_server_whole(served):
    tally, problems, summary = attack(served.url, served.process.pid, requests=1500)
    print(tally.report(), summary, sep="\n")
    assert not tally.failures, "\n".join(tally.failures[:10])
    assert not problems, problems
    counts = tally.counts
    assert counts["raw"]["4xx"] >= 300 and counts["fields"]["4xx"] >= 500 and counts["fields"]["200"] >= 20
    assert counts["disconnects"]["left"] >= 10


def test_a_client_leaving_a_non_streamed_request_is_counted_499_and_frees_its_slot(served):
    attacker = Attacker(served.url)
    before = _requests(attacker, "499")
    body = {"model": "tiny-a", "prompt": "Once", "max_tokens": 120, "ignore_eos": True}
    for _ in range(3):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/completions", json=body, headers=HEADERS, timeout=httpx.Timeout(5, read=0.01))
    deadline = time.monotonic() + 10
    while (attacker.in_flight() or _requests(attacker, "499") < before + 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert attacker.in_flight() == 0
    assert _requests(attacker, "499") == before + 3  # before the fix these ran on and were counted as 200


def test_megabyte_prompts_are_tokenized_off_the_event_loop(served):
    prompt = "Once upon a time there was a little cat. " * 90_000  # 3.6 MB: seconds of tokenizing
    answers = []

    def send():
        answers.append(httpx.post(served.url + "/v1/completions", json={"model": "tiny-a", "prompt": prompt},
                                  headers=HEADERS, timeout=120))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    slowest = 0.0
    while any(t.is_alive() for t in threads):
        started = time.perf_counter()
        assert httpx.get(served.url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [400] * 3
    assert all(a.json()["error"]["code"] == "context_length_exceeded" for a in answers)
    print(f"slowest /health: {slowest:.3f} s")
    assert slowest < 1.5, f"/health took {slowest:.2f} s while prompts were tokenized"


def test_sigterm_ends_requests_in_flight_with_an_error_event_and_a_json_503(tmp_path):
    server = start_server(tmp_path, shutdown_grace=0, max_num_seqs=1)  # one at a time: the others wait
    body = {"model": "tiny-a", "prompt": "Once", "max_tokens": 120, "ignore_eos": True}
    results: dict = {}

    def stream(i):
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=HEADERS,
                          timeout=60) as response:
            results[i] = (response.status_code, response.read())

    def plain():
        response = httpx.post(server.url + "/v1/completions", json=body, headers=HEADERS, timeout=60)
        results["plain"] = (response.status_code, response.content)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)] + [threading.Thread(target=plain)]
    for t in threads:
        t.start()
    # Signal only once the server holds all seven: one that had not yet arrived would meet a closed socket.
    deadline = time.monotonic() + 30
    while _received(server.url, "tiny-a") < len(threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert server.process.wait(30) == 0
    cut = []
    for key in ["plain", *range(6)]:
        status, content = results[key]
        if status == 503:  # still waiting for its turn when the grace ended: no stream began, a JSON 503
            cut.append(json.loads(content))
        elif key != "plain":  # a stream that began ends with [DONE], after an error event if it was cut
            assert status == 200 and content.rstrip().endswith(b"data: [DONE]"), content[-200:]
            cut += [json.loads(e[6:]) for e in content.split(b"\n\n") if e.startswith(b'data: {"error"')]
        else:
            assert status == 200, content[-200:]
    assert cut, "every request finished before the signal: nothing was tested"
    assert all(c["error"]["code"] == "server_shutting_down" for c in cut), cut


def _received(url: str, model: str) -> int:
    """Requests the server has taken for ``model``: answered, running or queued (from /metrics)."""
    text = httpx.get(url + "/metrics", headers=HEADERS, timeout=10).text
    pattern = rf'^hubprune_requests(?:_total|_in_flight)\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$'
    return sum(int(float(v)) for v in re.findall(pattern, text, re.M))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_stopped_compare_app_leaves_no_server_behind(tmp_path, sig):
    dirs = tiny_models(tmp_path)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, "-m", "hubprune.cli", "compare", str(dirs["tiny-a"]), str(dirs["tiny-b"]),
                            "--engine", "transformers", "--device", "cpu", "--no-browser", "--port", str(free_port())],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in app.stdout:  # the app prints its URL once the server behind it answers
            if "hubprune compare:" in line:
                break
        servers = [p for p in psutil.Process(app.pid).children(recursive=True) if "serve" in p.cmdline()]
        assert servers, "compare started no hubprune serve"
        started = time.monotonic()
        app.send_signal(sig)  # SIGINT: Ctrl-C
        app.wait(20)
        gone, alive = psutil.wait_procs(servers, timeout=20)
        assert not alive, f"hubprune serve still running after compare got {sig.name}: {[p.pid for p in alive]}"
        if sig == signal.SIGINT:
            assert time.monotonic() - started < 8, "Ctrl-C took 8 s or more to stop the app and its server"
    finally:
        if app.poll() is None:
            app.kill()


def test_the_compare_app_refuses_an_overlong_prompt():
    from hubprune.space.app import MAX_PROMPT_CHARS, _check_request

    message = _check_request("x" * (MAX_PROMPT_CHARS + 1), ["a", "b"], False, {"a": None, "b": None})
    assert message and "at most 16,000" in message and "Nothing was sent" in message


def _requests(attacker: Attacker, status: str) -> int:
    text = attacker.client.get("/metrics").text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("hubprune_requests_total{") and f'status="{status}"' in line)


if __name__ == "__main__":
    sys.exit(pytest.main([str(Path(__file__)), "-v"]))
