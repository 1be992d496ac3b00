"""The comparison app (space/) on tiny random models: backends, the Gradio API, failures, blind votes, the CLI.

Every app test launches the real Gradio server on 127.0.0.1 and talks to it with gradio_client; the
models are real (tiny, random) transformers checkpoints, one of them pruned by hubprune itself.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from hubprune.space.app import build_app
from hubprune.space.backends import Backend, InProcessBackend, OpenAIBackend, Sampling
from hubprune.space.figures import PanelStats, diff_html, layer_map_html, stats_html
from hubprune.space.launch import free_port, serve_available

ROOT = Path(__file__).resolve().parent.parent
REMOVED = [2, 3]
# /compare returns: status, then per panel (heading, answer, stats, layer map), then the diff.
STATUS, DIFF = 0, -1


def heading(result, i):
    return result[1 + 4 * i]


def answer(result, i):
    return result[2 + 4 * i]


def stats(result, i):
    return result[3 + 4 * i]


def layers(result, i):
    return result[4 + 4 * i]


def figures(html: str) -> dict[str, float]:
    """The numeric figures of a stats table, by name."""
    return {k: float(v) for k, v in re.findall(r'data-fig="(\w+)" data-value="([^"]+)"', html)}


def removed_in(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'class="layer removed" data-layer="(\d+)"', html)]


@contextmanager
def launched(demo):
    """The app served on a free 127.0.0.1 port, and a gradio_client Client for it."""
    from gradio_client import Client

    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def compare_args(prompt, models, *, temperature=0.7, top_p=0.95, max_tokens=32, seed=0, blind=False):
    return (prompt, list(models), temperature, top_p, max_tokens, seed, blind)


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny 6-layer Llama with layers 2 and 3 removed by hubprune (a real hubprune folder)."""
    from hubprune import LayerPruner

    out = tmp_path_factory.mktemp("space") / "tiny-pruned"
    pruner = LayerPruner.from_pretrained(str(tiny_model_dir), device="cpu")
    pruner.prune(layers=REMOVED).save_pretrained(out, plot=False)
    return out


@pytest.fixture(scope="module")
def backends(tiny_model_dir, pruned_dir) -> list[InProcessBackend]:
    return [InProcessBackend(tiny_model_dir, name="original", device="cpu"),
            InProcessBackend(pruned_dir, name="pruned", device="cpu")]


class CountingBackend(Backend):
    """A real backend that also counts how often the app called it, and keeps the streams it gave."""

    def __init__(self, inner: Backend):
        self.inner, self.name, self.calls, self.streams = inner, inner.name, 0, []

    def stream(self, prompt, sampling):
        self.calls += 1
        self.streams.append(self.inner.stream(prompt, sampling))
        return self.streams[-1]

    def info(self):
        self.calls += 1
        return self.inner.info()


# ------------------------------------------------------------------------------------------------
# Backends and helpers


def test_in_process_backend_streams_counts_tokens_and_is_reproducible(backends):
    original, pruned = backends
    sampling = Sampling(temperature=0.9, top_p=0.9, max_tokens=24, seed=7)
    first = original.stream("Once upon a time", sampling)
    chunks = list(first)
    assert len(chunks) > 1 and "".join(chunks)
    assert 1 <= first.tokens <= 24
    again = original.stream("Once upon a time", sampling)
    assert "".join(again) == "".join(chunks) and again.tokens == first.tokens
    other = original.stream("Once upon a time", Sampling(temperature=0.9, top_p=0.9, max_tokens=24, seed=8))
    assert "".join(other) != "".join(chunks)


def test_in_process_backend_reports_the_layers_the_record_says(backends):
    original, pruned = (b.info() for b in backends)
    assert (original.layers, original.base_layers, original.removed_layers) == (6, 6, [])
    assert (pruned.layers, pruned.base_layers, pruned.removed_layers) == (4, 6, REMOVED)
    assert 0 < pruned.parameters < original.parameters
    assert "weights" in pruned.memory and "RSS" in pruned.memory


def test_a_served_original_known_only_by_hub_id_gets_its_size_from_the_pruned_record(pruned_dir, tmp_path):
    from hubprune.space.backends import make_backends

    record = json.loads((pruned_dir / "hubprune.json").read_text())
    record["base_model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a copy pruned from a Hub model
    record["evaluation"] = {"chat": {"top1_agreement": 0.83}}  # as hubprune eval --chat writes it
    copy = tmp_path / "copy-pruned"
    copy.mkdir()
    (copy / "hubprune.json").write_text(json.dumps(record))
    url = f"http://127.0.0.1:{free_port()}"  # nothing answers: every fact must come from the files
    original, pruned = (b.info() for b in make_backends([record["base_model"], str(copy)], url))
    assert (original.layers, original.base_layers, original.parameters) == (6, 6, record["parameters_before"])
    assert (pruned.layers, pruned.removed_layers, pruned.parameters) == (4, REMOVED, record["parameters_after"])
    assert (original.chat_agreement, pruned.chat_agreement) == (None, 0.83)
    assert original.memory.startswith("n/a")


def test_sampling_rejects_bad_values():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"seed": -3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Sampling(**bad)


def test_panel_stats_and_figures():
    s = PanelStats(started=10.0)
    s.chunk(1, now=10.5)
    s.chunk(11, now=11.5)
    s.finish(now=11.5)
    assert (s.ttft, s.total, s.tokens) == (0.5, 1.5, 11)
    assert s.tokens_per_second == pytest.approx(10.0)
    info = {"layers": 24, "base_layers": 30, "parameters": 106_000_000, "memory": "weights 1 GiB"}
    html = stats_html(s, info)
    assert figures(html) == {"ttft": 0.5, "tps": 10.0, "total": 1.5, "tokens": 11, "layers": 24, "params": 106_000_000}
    assert "24 of 30" in html and "106.0 M" in html
    hidden = stats_html(s, info, hide_identity=True)
    assert "24 of 30" not in hidden and "hidden until you vote" in hidden
    measured = stats_html(s, {**info, "chat_agreement": 0.83})
    assert figures(measured)["agree"] == 0.83 and "83%" in measured
    assert "agree" not in figures(stats_html(s, {**info, "chat_agreement": 0.83}, hide_identity=True))


def test_layer_map_marks_the_removed_layers():
    html = layer_map_html({"base_layers": 30, "removed_layers": [13, 14, 15, 16, 17, 18]})
    assert len(re.findall(r'class="layer ', html)) == 30
    assert removed_in(html) == [13, 14, 15, 16, 17, 18]
    assert "removed layers 13-18 of 30" in html
    assert "all 30 layers" in layer_map_html({"base_layers": 30, "removed_layers": []})
    narrowed = layer_map_html({"base_layers": 30, "removed_layers": [], "reshaped": "MLP width 1536 → 1152"})
    assert "all 30 layers kept · MLP width 1536 → 1152" in narrowed and "original" not in narrowed
    assert "n/a" in layer_map_html({"base_layers": None}) and "hidden" in layer_map_html({}, hidden=True)


def test_diff_marks_words_only_in_one_answer():
    html = diff_html("The capital of France is Paris.", "The capital of France is Lyon, I think.")
    assert re.findall(r"<del[^>]*>([^<]*)</del>", html)[-1] == "Paris."
    assert re.findall(r"<ins[^>]*>([^<]*)</ins>", html)[-1] == "Lyon, I think."
    assert "The capital of France is " in html
    assert 0 < float(re.search(r'data-value="([\d.]+)"', html).group(1)) < 1
    assert "100% of words shared" in diff_html("same words", "same words")
    assert "&lt;b&gt;" in diff_html("<b>", "x")  # model output is escaped, never rendered as HTML


# ------------------------------------------------------------------------------------------------
# The app through its API


def test_api_streams_both_panels_at_once_with_figures_and_layer_maps(backends):
    with launched(build_app(backends)) as client:
        job = client.submit(*compare_args("Once upon a time", ["original", "pruned"], max_tokens=96, temperature=0),
                            api_name="/compare")
        result = job.result(timeout=120)
        updates = job.outputs()
    assert result[STATUS] == "Done."
    assert heading(result, 0) == "### A · original" and heading(result, 1) == "### B · pruned"
    assert answer(result, 0) and answer(result, 1)
    assert len(updates) > 3  # streamed: several updates before the last
    a, b = figures(stats(result, 0)), figures(stats(result, 1))
    for fig in (a, b):
        assert fig["ttft"] > 0 and fig["total"] > fig["ttft"] and fig["tokens"] >= 2 and fig["tps"] > 0
        assert fig["params"] > 0
    # Both ran at once: each panel's first text came before the other panel finished.
    assert a["ttft"] < b["total"] and b["ttft"] < a["total"]
    assert (a["layers"], b["layers"]) == (6, 4)
    assert removed_in(layers(result, 0)) == [] and removed_in(layers(result, 1)) == REMOVED
    assert "of words shared" in result[DIFF]


def test_api_regenerate_uses_the_next_seed_and_clear_empties_the_page(backends):
    with launched(build_app(backends)) as client:
        client.predict(*compare_args("Once upon a time", ["original", "pruned"], seed=5), api_name="/compare")
        assert client.predict("", 0.7, 5, api_name="/regenerate") == ("Once upon a time", 6)
        assert client.predict("", 0, 5, api_name="/regenerate") == ("Once upon a time", 5)  # greedy: same seed
        cleared = client.predict(api_name="/clear")
    assert cleared[0] == "" and cleared[1] == "" and answer(cleared[1:], 0) == "" and answer(cleared[1:], 1) == ""


def test_a_backend_that_is_down_fails_in_its_own_panel_while_the_other_streams(backends):
    down = OpenAIBackend("down-model", f"http://127.0.0.1:{free_port()}/v1", name="down-model")
    with launched(build_app([down, backends[1]])) as client:
        result = client.predict(*compare_args("Once upon a time", ["down-model", "pruned"]), api_name="/compare")
    assert result[STATUS] == "Done (1 failed)."
    assert "down-model failed" in answer(result, 0) and "cannot reach the server" in answer(result, 0)
    assert answer(result, 1) and "failed" not in answer(result, 1)
    assert figures(stats(result, 1))["tokens"] >= 1 and figures(stats(result, 0))["tokens"] == 0
    assert "n/a" in stats(result, 0)  # the down server's memory is not made up


def test_an_empty_prompt_shows_a_message_and_calls_no_backend(backends):
    counted = [CountingBackend(b) for b in backends]
    with launched(build_app(counted)) as client:
        result = client.predict(*compare_args("   ", ["original", "pruned"]), api_name="/compare")
        assert "Type a prompt first" in result[STATUS]
        assert [c.calls for c in counted] == [0, 0]
        too_few = client.predict(*compare_args("Hi", ["original"]), api_name="/compare")
        assert "two or more" in too_few[STATUS] and [c.calls for c in counted] == [0, 0]
        client.predict(*compare_args("Hi", ["original", "pruned"], max_tokens=4), api_name="/compare")
    assert all(c.calls >= 2 for c in counted)  # info + stream once a prompt is there


def test_clear_stops_the_generation_under_way(backends):
    counted = [CountingBackend(b) for b in backends]
    with launched(build_app(counted)) as client:
        job = client.submit(*compare_args("Once upon a time", ["original", "pruned"], max_tokens=240, temperature=0),
                            api_name="/compare")
        deadline = time.monotonic() + 60
        while not all(c.streams and c.streams[-1].tokens for c in counted) and time.monotonic() < deadline:
            time.sleep(0.01)
        cleared = client.predict(api_name="/clear")
        time.sleep(1.0)
        counts = [c.streams[-1].tokens for c in counted]
        time.sleep(0.5)
    assert cleared[0] == "" and all(c.streams[-1].stopped.is_set() for c in counted)
    assert [c.streams[-1].tokens for c in counted] == counts  # nothing generated after the stop
    assert all(n < 240 for n in counts), counts
    assert job.status().code.name in ("CANCELLED", "FINISHED")


def _swapping_seed() -> int:
    """A shuffle seed whose first shuffle puts the second model first."""
    for seed in range(100):
        order = ["original", "pruned"]
        random.Random(seed).shuffle(order)
        if order[0] == "pruned":
            return seed
    raise AssertionError("no seed swaps the order")


def test_blind_mode_hides_names_until_the_vote_and_appends_it_to_the_log(backends, tmp_path):
    votes = tmp_path / "logs" / "votes.jsonl"
    with launched(build_app(backends, votes_path=votes, shuffle_seed=_swapping_seed())) as client:
        early = client.predict(api_name="/vote_a")
        assert "Nothing to vote on" in early[STATUS] and not votes.exists()
        blind = client.predict(*compare_args("Tell me a story", ["original", "pruned"], seed=3, blind=True),
                               api_name="/compare")
        shown = json.dumps(blind)
        assert "original" not in shown and "pruned" not in shown  # names, layer maps and sizes all held back
        assert heading(blind, 0).endswith("Model A") and heading(blind, 1).endswith("Model B")
        assert answer(blind, 0) and answer(blind, 1) and "Vote below" in blind[STATUS]
        revealed = client.predict(api_name="/vote_b")
        again = client.predict(api_name="/vote_a")
    assert heading(revealed, 0) == "### A · pruned" and heading(revealed, 1) == "### B · original"
    assert "A was **pruned**, B was **original**" in revealed[STATUS]
    assert removed_in(layers(revealed, 0)) == REMOVED
    assert "already voted" in again[STATUS]
    lines = [json.loads(line) for line in votes.read_text().splitlines()]
    assert len(lines) == 1
    vote = lines[0]
    assert vote["models"] == ["pruned", "original"] and vote["vote"] == "B" and vote["blind"] is True
    assert vote["prompt"] == "Tell me a story"
    assert vote["sampling"] == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 32, "seed": 3}
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", vote["time"])


def test_blind_mode_compares_exactly_two(backends, tiny_model_dir):
    third = InProcessBackend(tiny_model_dir, name="third", device="cpu")
    with launched(build_app([*backends, third])) as client:
        result = client.predict(*compare_args("Hi", ["original", "pruned", "third"], blind=True), api_name="/compare")
        assert "exactly two" in result[STATUS]
        three = client.predict(*compare_args("Hi", ["original", "pruned", "third"], max_tokens=4), api_name="/compare")
    assert three[STATUS] == "Done." and all(answer(three, i) for i in range(3))


# ------------------------------------------------------------------------------------------------
# hubprune compare


def _start(args: list[str], cwd: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a command that prints 'hubprune compare: ... at URL' (or Gradio's URL); return it and the URL."""
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
    lines, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        found = re.search(r"(?:at|URL:)\s+(http://127\.0\.0\.1:\d+/?)", line)
        if found and ("hubprune compare:" in line or "Running on local URL" in line):
            return process, found.group(1)
    process.kill()
    raise AssertionError("no URL printed:\n" + "".join(lines[-30:]))


def _stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def test_compare_cli_in_process_prints_the_url_and_serves_the_app(tiny_model_dir, pruned_dir, tmp_path):
    from gradio_client import Client

    port = free_port()
    process, url = _start([sys.executable, "-m", "hubprune.cli", "compare", str(tiny_model_dir), str(pruned_dir),
                           "--no-server", "--no-browser", "--port", str(port), "--votes", str(tmp_path / "v.jsonl")],
                          cwd=tmp_path)
    try:
        assert url.rstrip("/") == f"http://127.0.0.1:{port}"
        result = Client(url, verbose=False).predict(
            *compare_args("Hi", [tiny_model_dir.name, "tiny-pruned"], max_tokens=8), api_name="/compare")
        assert result[STATUS] == "Done." and removed_in(layers(result, 1)) == REMOVED
    finally:
        assert _stop(process) in (0, 128 + signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []  # nothing written: no vote was cast


def test_compare_cli_refuses_a_single_model(capsys):
    from hubprune.cli import main

    assert main(["compare", "HuggingFaceTB/SmolLM2-135M-Instruct", "--no-browser"]) == 2
    assert "two or more models" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not serve_available(), reason="this hubprune has no `hubprune serve` to start")
def test_compare_cli_starts_hubprune_serve_and_stops_it(tiny_model_dir, pruned_dir, tmp_path):
    import httpx
    from gradio_client import Client

    process, url = _start([sys.executable, "-m", "hubprune.cli", "compare", str(tiny_model_dir), str(pruned_dir),
                           "--engine", "transformers", "--device", "cpu", "--no-browser", "--port", str(free_port())],
                          cwd=tmp_path)
    try:
        result = Client(url, verbose=False).predict(
            *compare_args("Hi", [tiny_model_dir.name, "tiny-pruned"], max_tokens=8), api_name="/compare")
        assert result[STATUS] == "Done."
        assert figures(stats(result, 0))["tokens"] >= 1 and figures(stats(result, 1))["layers"] == 4
        assert removed_in(layers(result, 1)) == REMOVED  # the local folder's record, though the text came by HTTP
        served = OpenAIBackend("tiny-pruned", _server_url(process))
        assert "".join(served.stream("Hi", Sampling(max_tokens=4)))
    finally:
        server = _server_url(process)
        assert _stop(process) in (0, 128 + signal.SIGTERM)
    with pytest.raises(httpx.HTTPError):  # the server it started is gone too
        httpx.get(server + "/models", timeout=2)


def _server_url(process) -> str:
    cmdline = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    for child in cmdline:
        args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"serve" in args:
            return f"http://127.0.0.1:{args[args.index(b'--port') + 1].decode()}/v1"
    raise AssertionError("no hubprune serve child process")


# ------------------------------------------------------------------------------------------------
# The Space: files, push, and the pushed app running


def test_space_readme_front_matter_matches_the_installed_gradio():
    import gradio
    from huggingface_hub import SpaceCard

    data = SpaceCard.load(ROOT / "space" / "README.md").data
    assert (data.sdk, data.sdk_version, data.app_file, data.license) == ("gradio", gradio.__version__, "app.py",
                                                                         "apache-2.0")
    assert data.title and data.emoji and data.colorFrom and data.colorTo
    assert 0 < len(data.short_description) <= 60  # the Hub's limit


def test_space_requirements_cover_hubprunes_runtime_needs():
    import importlib.metadata

    from packaging.requirements import Requirement

    listed = {Requirement(line).name.lower() for line in (ROOT / "space" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    needed = {Requirement(r).name.lower() for r in importlib.metadata.requires("hubprune")
              if "extra" not in r or 'extra == "space"' in r} - {"gradio"}  # the Space's SDK brings gradio
    assert needed <= listed, needed - listed


def test_space_push_validates_its_arguments_before_touching_the_hub(hub, capsys):
    from hubprune.cli import main

    cases = [(["me/cmp", "--models", "org/original"], "two or more models"),
             (["me/cmp", "--models", "org/a", "org/a"], "names a model twice"),
             (["me/cmp", "--models", "org/original", str(ROOT / "space")], "not a Hub id"),
             (["not a repo id", "--models", "org/a", "org/b"], "not a repo id")]
    for args, message in cases:
        assert main(["space", "push", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hubprune: error: ") and message in err, err
    assert not hub.server.repos


def test_space_push_creates_a_gradio_space_in_one_commit_and_updates_it(hub, capsys, tmp_path):
    from huggingface_hub import metadata_load

    from hubprune.cli import main

    repo = f"{hub.user}/smollm2-compare"
    args = ["space", "push", repo, "--models", "org/original,org/pruned", "--token", hub.token]
    assert main(args) == 0
    out = capsys.readouterr()
    assert hub.token not in out.out + out.err and repo in out.out
    assert hub.server.repos[("space", repo)].sdk == "gradio"
    files = hub.server.files(repo, repo_type="space")
    for name in ("app.py", "backends.py", "figures.py", "votes.py", "requirements.txt", "README.md",
                 "hubprune/__init__.py", "hubprune/loading.py", "hubprune/cards/model_card.md.j2"):
        assert name in files, name
    assert not [f for f in files if f.startswith(("hubprune/space/", "hubprune/server/")) or "__pycache__" in f]
    (tmp_path / "README.md").write_bytes(files["README.md"])
    meta = metadata_load(tmp_path / "README.md")
    assert meta["models"] == ["org/original", "org/pruned"] and meta["sdk"] == "gradio"
    assert len(hub.server.commits(repo, repo_type="space")) == 2  # the initial commit + ONE with every file
    assert main([*args[:3], "--models", "org/original", "org/pruned-v2", "--token", hub.token]) == 0  # exists: updated
    assert len(hub.server.commits(repo, repo_type="space")) == 3


def test_the_pushed_space_runs_as_app_py_and_compares_hub_models(hub, tiny_model_dir, pruned_dir, tmp_path):
    """The Space repo as the Hub serves it: `python app.py` loads both models from the Hub and compares them."""
    from gradio_client import Client
    from huggingface_hub import HfApi, snapshot_download

    from hubprune.hub import push_folder
    from hubprune.space.push import push_space

    original, pruned, space = f"{hub.user}/tiny", f"{hub.user}/tiny-pruned", f"{hub.user}/tiny-compare"
    api = HfApi(token=hub.token)
    api.create_repo(original)
    api.upload_folder(repo_id=original, folder_path=str(tiny_model_dir))
    push_folder(pruned_dir, pruned, token=hub.token)
    push_space(space, [original, pruned], token=hub.token)
    folder = Path(snapshot_download(space, repo_type="space", local_dir=tmp_path / "space"))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "PYTHONPATH", "HUBPRUNE_MODELS")}
    env.update(GRADIO_SERVER_PORT=str(free_port()), HUBPRUNE_VOTES=str(tmp_path / "votes.jsonl"),
               HUBPRUNE_DEVICE="cpu", GRADIO_ANALYTICS_ENABLED="False")
    process, url = _start([sys.executable, "app.py"], cwd=folder, env=env)
    try:
        client = Client(url, verbose=False)
        result = client.predict(*compare_args("Hi", [original, pruned], max_tokens=8), api_name="/compare")
        assert result[STATUS] == "Done." and answer(result, 0) and answer(result, 1)
        assert removed_in(layers(result, 1)) == REMOVED  # read from the pruned repo's hubprune.json on the Hub
        client.predict(api_name="/vote_tie")
    finally:
        _stop(process)
    assert json.loads((tmp_path / "votes.jsonl").read_text())["models"] == [original, pruned]
    imported = subprocess.run([sys.executable, "-c", "import hubprune, app; print(hubprune.__file__)"], cwd=folder,
                              env=env, capture_output=True, text=True, check=True).stdout
    assert Path(imported.strip()).is_relative_to(folder)  # the Space imports its own copy of hubprune


def test_a_vote_with_unicode_line_separators_stays_one_line(tmp_path):
    from hubprune.space.votes import append_vote

    path = tmp_path / "votes.jsonl"
    prompt = "one\u2028two\u0085three\u2029four\r\nfive \u00e9"
    append_vote(path, prompt=prompt, models=["a", "b"], vote="tie", sampling={}, blind=False)
    append_vote(path, prompt="next", models=["a", "b"], vote="A", sampling={}, blind=False)
    lines = path.read_bytes().decode("utf-8").splitlines()  # str.splitlines splits at U+2028 and U+0085 too
    assert len(lines) == 2 and json.loads(lines[0])["prompt"] == prompt
