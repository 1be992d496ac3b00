"""hubprune compare: one prompt, two or more models, answers streamed side by side (a Gradio Blocks app).

Runs three ways: ``hubprune compare ORIGINAL PRUNED`` (local), ``python app.py`` in a Space repo
(models from ``$HUBPRUNE_MODELS`` or the README's ``models:`` list, server from
``$HUBPRUNE_SERVER_URL``), or ``build_app(backends)`` from Python::

    demo = build_app(make_backends(["HuggingFaceTB/SmolLM2-135M-Instruct", "out/smollm2-24l"]))
    demo.queue().launch()

Named API endpoints: ``/compare``, ``/regenerate``, ``/clear``, ``/vote_a``, ``/vote_b``, ``/vote_tie``.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gradio as gr

if __package__:  # imported as hubprune.space.app
    from .backends import Backend, Sampling, make_backends
    from .figures import PanelStats, diff_html, layer_map_html, stats_html
    from .votes import append_vote, default_votes_path
else:  # run as the top-level app.py of a Space repository
    from backends import Backend, Sampling, make_backends  # type: ignore[no-redef]
    from figures import PanelStats, diff_html, layer_map_html, stats_html  # type: ignore[no-redef]
    from votes import append_vote, default_votes_path  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

MAX_PANELS = 4
MAX_PROMPT_CHARS = 16_000  # a longer prompt is refused before any model sees it
LETTERS = "ABCD"
REFRESH_SECONDS = 0.1  # at most ten UI updates a second while streaming
EXAMPLES = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that checks whether a number is prime.",
    "Give three tips for a good night's sleep.",
]
INTRO = (
    "# ✂️ hubprune compare\nOne prompt, several models, answers streamed side by side: the original beside "
    "its pruned copies, with time to first token, speed, layers kept and a map of the layers removed."
)


def build_app(
    backends: list[Backend],
    *,
    votes_path: str | os.PathLike | None = None,
    shuffle_seed: int | None = None,
    examples: list[str] | None = None,
) -> gr.Blocks:
    """The Blocks app over ``backends`` (two or more). Votes go to ``votes_path`` (JSONL).

    ``shuffle_seed`` fixes the order in which blind mode shuffles the panels (default: random).
    Example: ``build_app(make_backends(["HuggingFaceTB/SmolLM2-135M-Instruct", "out/smollm2-24l"])).launch()``
    """
    if len(backends) < 2:
        raise ValueError(f"the app compares two or more models, got {len(backends)}")
    by_name = {b.name: b for b in backends}
    if len(by_name) != len(backends):
        raise ValueError(f"backend names must differ, got {[b.name for b in backends]}")
    votes = Path(votes_path) if votes_path else default_votes_path()
    shuffler = random.Random(shuffle_seed)
    slots = min(len(backends), MAX_PANELS)
    names = list(by_name)

    with gr.Blocks(title="hubprune compare") as demo:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            models = gr.Dropdown(
                names,
                value=names[:slots],
                multiselect=True,
                max_choices=slots,
                scale=4,
                label=f"Models (two to {slots})" if slots > 2 else "Models",
                elem_id="models",
            )
            blind = gr.Checkbox(False, label="Blind A/B: hide names until you vote", scale=1, elem_id="blind")
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(
                placeholder="Ask something…",
                label="prompt",
                show_label=False,
                lines=2,
                scale=6,
                elem_id="prompt",
                max_length=MAX_PROMPT_CHARS,
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Accordion("Sampling (shared by all panels)", open=False):
            with gr.Row():
                temperature = gr.Slider(
                    0, 2, value=0.7, step=0.05, label="temperature (0 = greedy)", elem_id="temperature"
                )
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top_p", elem_id="top-p")
                max_tokens = gr.Slider(1, 1024, value=256, step=1, label="max tokens", elem_id="max-tokens")
                seed = gr.Number(0, precision=0, minimum=0, label="seed (shared)", elem_id="seed")
        gr.Examples(examples or EXAMPLES, inputs=[prompt], label="Example prompts")
        status = gr.Markdown(elem_id="status")
        panels = []
        with gr.Row(equal_height=False):
            for i in range(slots):
                with gr.Column(visible=i < 2, elem_id=f"panel-{i}", variant="panel") as column:
                    heading = gr.Markdown(_heading(i, names[i], False), elem_id=f"heading-{i}")
                    answer = gr.Markdown("", min_height=180, max_height=520, elem_id=f"answer-{i}", buttons=["copy"])
                    stats = gr.HTML(stats_html(None, None), elem_id=f"stats-{i}")
                    layers = gr.HTML(layer_map_html(None), elem_id=f"layers-{i}")
                panels.append((column, heading, answer, stats, layers))
        with gr.Row():
            regenerate = gr.Button("Regenerate (next seed)", elem_id="regenerate")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Row():
            vote_buttons = [
                gr.Button(label, interactive=False, elem_id=f"vote-{key.lower()}")
                for key, label in (("A", "A is better"), ("tie", "Tie"), ("B", "B is better"))
            ]
        with gr.Accordion("Where the answers differ (A against B, word by word)", open=True):
            diff = gr.HTML(diff_html("", ""), elem_id="diff")
        state = gr.State(None)

        outputs = [status, *[c for panel in panels for c in panel], diff, *vote_buttons, state]
        sampling_inputs = [temperature, top_p, max_tokens, seed]

        def render(round_: dict | None, message: str = "") -> list:
            return _render(round_, message, slots, names)

        running: dict[str, threading.Event] = {}  # session -> the stop switch of its round

        def stop_session(request: gr.Request) -> None:
            switch = running.pop(getattr(request, "session_hash", None) or "", None)
            if switch is not None:
                switch.set()  # Gradio's cancel only drops the generator; this stops the threads at once

        def compare(text, chosen, temp, top, tokens, seed_value, blind_mode, previous, request: gr.Request):
            stop_session(request)
            session = getattr(request, "session_hash", None) or ""
            stop = running[session] = threading.Event()
            try:
                yield from _compare(
                    text,
                    chosen,
                    (temp, top, tokens, seed_value),
                    blind_mode,
                    previous,
                    by_name,
                    shuffler,
                    render,
                    stop,
                )
            finally:
                if running.get(session) is stop:
                    del running[session]

        def again(previous, text, temp, seed_value):
            last = previous["prompt"] if previous else text
            bump = previous is not None and float(temp) > 0  # greedy answers would not change
            return last, int(seed_value or 0) + (1 if bump else 0)

        def reset(request: gr.Request):
            stop_session(request)
            return ["", *render(None)]

        def vote(choice: str, round_: dict | None) -> list:
            return render(*_vote(choice, round_, votes))

        # One round at a time, whoever asks: in-process models share this machine's cores.
        generate = {"concurrency_limit": 1, "concurrency_id": "generate"}
        run = gr.on(
            [send.click, prompt.submit],
            compare,
            [prompt, models, *sampling_inputs, blind, state],
            outputs,
            api_name="compare",
            **generate,
        )
        rerun = regenerate.click(
            again, [state, prompt, temperature, seed], [prompt, seed], api_name="regenerate"
        ).then(
            compare, [prompt, models, *sampling_inputs, blind, state], outputs, api_visibility="private", **generate
        )
        clear.click(reset, None, [prompt, *outputs], api_name="clear", cancels=[run, rerun])
        for button, key in zip(vote_buttons, ("A", "tie", "B")):
            button.click(lambda r, k=key: vote(k, r), [state], outputs, api_name=f"vote_{key.lower()}")
        models.change(
            lambda chosen: [gr.update(visible=i < max(2, len(chosen or []))) for i in range(slots)],
            [models],
            [p[0] for p in panels],
            api_visibility="private",
        )
        demo.unload(stop_session)  # a closed tab stops its round too
    logger.info("app ready: %s; votes go to %s", ", ".join(names), votes)
    return demo


def _compare(text, chosen, sampling_values, blind_mode, previous, by_name, shuffler, render, stop: threading.Event):
    """The streaming generator behind /compare: one thread per panel, all feeding one queue; ``stop`` ends them."""
    prompt = (text or "").strip()
    chosen = list(chosen or [])
    problem = _check_request(prompt, chosen, blind_mode, by_name)
    if problem:
        yield render(previous, problem)
        return
    try:
        temp, top, tokens, seed_value = sampling_values
        sampling = Sampling(float(temp), float(top), int(tokens), int(seed_value or 0))
    except (TypeError, ValueError) as err:
        yield render(previous, f"Cannot send: {err}")
        return
    order = list(chosen)
    if blind_mode:
        shuffler.shuffle(order)
    now = time.perf_counter()
    round_: dict[str, Any] = {
        "prompt": prompt,
        "models": order,
        "sampling": sampling.to_dict(),
        "blind": bool(blind_mode),
        "texts": [""] * len(order),
        "errors": [None] * len(order),
        "infos": [None] * len(order),
        "stats": [PanelStats(started=now) for _ in order],
        "done": False,
        "vote": None,
    }
    events: queue.Queue = queue.Queue()
    for slot, name in enumerate(order):
        threading.Thread(
            target=_pump,
            args=(slot, by_name[name], prompt, sampling, events, stop),
            name=f"hubprune-panel-{slot}",
            daemon=True,
        ).start()
    yield render(round_, "Streaming…")
    finished, last_yield = 0, 0.0
    try:
        while finished < len(order) and not stop.is_set():
            try:
                event = events.get(timeout=REFRESH_SECONDS)
            except queue.Empty:
                event = None
            if event is not None:
                finished += _apply(round_, event)
            if time.perf_counter() - last_yield >= REFRESH_SECONDS and finished < len(order):
                last_yield = time.perf_counter()
                yield render(round_, "Streaming…")
        round_["done"] = True
        failed = sum(e is not None for e in round_["errors"])
        note = f" ({failed} failed)" if failed else ""
        hint = " Vote below to reveal the names." if round_["blind"] else ""
        yield render(round_, f"Done{note}.{hint}")
    finally:
        stop.set()  # the user cleared, left, or the round ended: every panel's generation stops


def _check_request(prompt: str, chosen: list[str], blind_mode: bool, by_name: dict) -> str | None:
    if not prompt:
        return "Type a prompt first: nothing was sent."
    if len(prompt) > MAX_PROMPT_CHARS:
        return (
            f"The prompt has {len(prompt):,} characters; this app takes at most {MAX_PROMPT_CHARS:,}. "
            "Nothing was sent."
        )
    unknown = [c for c in chosen if c not in by_name]
    if unknown:
        return f"Unknown model {unknown[0]!r}; choose from {', '.join(by_name)}"
    if len(chosen) < 2:
        return "Choose two or more models to compare."
    if len(chosen) > MAX_PANELS:
        return f"At most {MAX_PANELS} models side by side."
    if blind_mode and len(chosen) != 2:
        return "Blind A/B mode compares exactly two models: choose two."
    return None


def _pump(
    slot: int, backend: Backend, prompt: str, sampling: Sampling, events: queue.Queue, stop: threading.Event
) -> None:
    """Stream one backend into the shared queue; its failure becomes an event for its panel only."""
    try:
        events.put((slot, "info", asdict(backend.info())))
        stream = backend.stream(prompt, sampling)
        try:
            for text in stream:
                events.put((slot, "text", text, stream.tokens))
                if stop.is_set():
                    break
        finally:
            stream.close()
        events.put((slot, "info", asdict(backend.info())))  # memory after generating
        events.put((slot, "done", stream.tokens))
    except Exception as err:  # any failure of this backend stays in its own panel
        logger.warning("%s failed: %s: %s", backend.name, type(err).__name__, err)
        events.put((slot, "error", f"{type(err).__name__}: {err}"))


def _apply(round_: dict, event: tuple) -> int:
    """Fold one queue event into the round; returns 1 when a panel finished."""
    slot, kind, *payload = event
    stats: PanelStats = round_["stats"][slot]
    if kind == "info":
        round_["infos"][slot] = payload[0]
    elif kind == "text":
        round_["texts"][slot] += payload[0]
        stats.chunk(payload[1])
    elif kind == "done":
        stats.finish(payload[0])
        return 1
    elif kind == "error":
        round_["errors"][slot] = payload[0]
        stats.finish()
        return 1
    return 0


def _vote(choice: str, round_: dict | None, votes: Path) -> tuple[dict | None, str]:
    if not round_ or not round_.get("done"):
        return round_, "Nothing to vote on yet: send a prompt and wait for both answers."
    if round_.get("vote"):
        return round_, f"You already voted {round_['vote']} on this round."
    if len(round_["models"]) != 2:
        return round_, "Votes compare exactly two models."
    append_vote(
        votes,
        prompt=round_["prompt"],
        models=round_["models"],
        vote=choice,
        sampling=round_["sampling"],
        blind=round_["blind"],
    )
    round_ = {**round_, "vote": choice}
    a, b = round_["models"]
    verdict = "a tie" if choice == "tie" else f"{choice} is better"
    return round_, f"Vote recorded: {verdict}. A was **{a}**, B was **{b}**."


def _render(round_: dict | None, message: str, slots: int, names: list[str]) -> list:
    """Every output of the app for the current round (or an empty page when ``round_`` is None)."""
    shown = round_["models"] if round_ else names[:2]
    hidden = bool(round_ and round_["blind"] and not round_["vote"])
    values: list = [message]
    for i in range(slots):
        if i >= len(shown):
            values += [gr.update(visible=False), "", "", stats_html(None, None), layer_map_html(None)]
            continue
        if round_ is None:
            values += [
                gr.update(visible=True),
                _heading(i, shown[i], False),
                "",
                stats_html(None, None),
                layer_map_html(None),
            ]
            continue
        info, error, text = round_["infos"][i], round_["errors"][i], round_["texts"][i]
        name = f"Model {LETTERS[i]}" if hidden else shown[i]
        answer = text + (f"\n\n> **{name} failed:** {error}" if error else "")
        values += [
            gr.update(visible=True),
            _heading(i, shown[i], hidden),
            answer,
            stats_html(round_["stats"][i], info, hide_identity=hidden),
            layer_map_html(info, hidden=hidden),
        ]
    if round_ and round_["done"] and len(shown) >= 2:
        labels = ("A", "B") if hidden else (f"A ({shown[0]})", f"B ({shown[1]})")
        values.append(diff_html(round_["texts"][0], round_["texts"][1], labels))
    else:
        values.append(diff_html("", ""))
    can_vote = bool(round_ and round_["done"] and not round_["vote"] and len(shown) == 2)
    values += [gr.update(interactive=can_vote) for _ in range(3)]
    values.append(round_)
    return values


def _heading(i: int, name: str, hidden: bool) -> str:
    return f"### Model {LETTERS[i]}" if hidden else f"### {LETTERS[i]} · {name}"


def models_from_env(app_dir: Path | None = None) -> list[str]:
    """``$HUBPRUNE_MODELS`` (comma-separated), else the ``models:`` list of the README.md beside app.py."""
    listed = [m.strip() for m in os.environ.get("HUBPRUNE_MODELS", "").split(",") if m.strip()]
    if listed:
        return listed
    readme = (app_dir or Path(__file__).resolve().parent) / "README.md"
    if readme.is_file():
        from huggingface_hub import metadata_load

        listed = list((metadata_load(readme) or {}).get("models") or [])
    if len(listed) < 2:
        raise ValueError(
            "no models to compare: set HUBPRUNE_MODELS=ORIGINAL,PRUNED (Hub ids or folders) "
            "or list them under models: in the Space's README.md"
        )
    return listed


def main() -> None:
    """``python app.py`` in a Space: models and server from the environment; binds $GRADIO_SERVER_NAME or 127.0.0.1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        backends = make_backends(
            models_from_env(),
            os.environ.get("HUBPRUNE_SERVER_URL") or None,
            device=os.environ.get("HUBPRUNE_DEVICE", "auto"),
        )
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"app.py: {err}") from None
    build_app(backends).queue().launch()


if __name__ == "__main__":
    main()
