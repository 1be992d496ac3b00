"""What a panel shows beside its answer: live timings, model facts, a layer map, and the answer diff.

All HTML here carries its own inline styles (Gradio 6 takes page CSS only at ``launch``), and
every figure has a ``data-fig`` / ``data-value`` pair so a test or a script can read it back.
"""

from __future__ import annotations

import difflib
import html
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KEPT, REMOVED = "#2e9d5b", "#d64545"
_MUTED = "color:#6b7280"


@dataclass
class PanelStats:
    """Timing of one answer. All times are ``time.perf_counter()`` seconds."""

    started: float
    first_at: float | None = None
    last_at: float | None = None
    tokens: int = 0
    done: bool = False

    def chunk(self, tokens: int, now: float | None = None) -> None:
        """Record that text arrived and ``tokens`` tokens have been generated in all."""
        now = time.perf_counter() if now is None else now
        if self.first_at is None:
            self.first_at = now
        self.last_at, self.tokens = now, tokens

    def finish(self, tokens: int | None = None, now: float | None = None) -> None:
        self.done = True
        self.last_at = time.perf_counter() if now is None else now
        if tokens is not None:
            self.tokens = tokens

    @property
    def ttft(self) -> float | None:
        """Seconds from the request to the first text."""
        return None if self.first_at is None else self.first_at - self.started

    @property
    def total(self) -> float:
        """Seconds from the request to the last text (or to now while streaming)."""
        end = self.last_at if self.done and self.last_at is not None else time.perf_counter()
        return end - self.started

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first over the time since the first (as vLLM reports it)."""
        if self.first_at is None or self.last_at is None or self.tokens < 2 or self.last_at <= self.first_at:
            return None
        return (self.tokens - 1) / (self.last_at - self.first_at)


def stats_html(stats: PanelStats | None, info: dict | None, *, hide_identity: bool = False) -> str:
    """The figures of one panel as a small two-column table.

    ``info`` is a ``ModelInfo`` as a dict; with ``hide_identity`` (blind mode before the vote)
    layers, parameters and memory are held back, since they would name the model.
    """
    rows: list[tuple[str, str, Any, Callable[[Any], str]]] = []
    if stats is not None:
        rows += [
            ("ttft", "time to first token", stats.ttft, _seconds),
            ("tps", "tokens/s (decode)", stats.tokens_per_second, lambda v: f"{v:.1f}"),
            ("total", "total time", stats.total, _seconds),
            ("tokens", "tokens generated", stats.tokens, lambda v: f"{v:d}"),
        ]
    if info is not None and not hide_identity:
        layers, base = info.get("layers"), info.get("base_layers")
        rows.append(("layers", "layers kept", layers, lambda v: f"{v} of {base}" if base else f"{v}"))
        rows.append(("params", "parameters", info.get("parameters"), human_count))
        if info.get("chat_agreement") is not None:  # measured offline on held-out prompts, not on this answer
            rows.append(("agree", "agrees with original (top-1)", info["chat_agreement"], lambda v: f"{v:.0%}"))
        rows.append(("memory", "memory", info.get("memory") or "n/a", str))
    elif info is not None:
        rows.append(("hidden", "layers, parameters, memory", "hidden until you vote", str))
    cards = []
    for key, label, value, fmt in rows:
        pending = "…" if key in ("ttft", "tps") and not (stats and stats.done) else "n/a"
        shown = pending if value is None else html.escape(fmt(value))
        data = "" if value is None or isinstance(value, str) else f' data-value="{value}"'
        wide = "grid-column:1/-1;" if key in ("memory", "hidden") else ""
        cards.append(
            f'<div style="{wide}border:1px solid rgba(127,127,127,.25);border-radius:6px;padding:3px 8px">'
            f'<div style="{_MUTED};font-size:0.75em">{label}</div>'
            f'<div data-fig="{key}"{data} style="font-weight:600;font-variant-numeric:tabular-nums">'
            f"{shown}</div></div>"
        )
    return (
        '<div class="hubprune-stats" style="display:grid;grid-template-columns:repeat(auto-fill,minmax(118px,1fr));'
        f'gap:6px;margin:4px 0 8px">{"".join(cards)}</div>'
    )


def layer_map_html(info: dict | None, *, hidden: bool = False) -> str:
    """A strip of one cell per layer of the original; removed layers are red and crossed out."""
    if hidden:
        return (
            f'<div class="hubprune-layermap" style="{_MUTED};font-size:0.85em">layer map hidden until you vote</div>'
        )
    base = (info or {}).get("base_layers")
    if not base:
        return (
            f'<div class="hubprune-layermap" style="{_MUTED};font-size:0.85em">'
            "layer map n/a (layer count unknown)</div>"
        )
    removed = set((info or {}).get("removed_layers") or [])
    cells = []
    for i in range(base):
        gone = i in removed
        style = (
            f"flex:1;min-width:6px;height:22px;border-radius:3px;background:{REMOVED if gone else KEPT};"
            "color:white;font-size:9px;line-height:22px;text-align:center;overflow:hidden;"
            + (
                "background-image:repeating-linear-gradient(45deg,transparent 0 3px,rgba(255,255,255,.45) 3px 5px)"
                if gone
                else ""
            )
        )
        cells.append(
            f'<div class="layer {"removed" if gone else "kept"}" data-layer="{i}" '
            f'title="layer {i}: {"removed" if gone else "kept"}" style="{style}">{i}</div>'
        )
    reshaped = (info or {}).get("reshaped")
    summary = (
        f"removed {describe_layers(sorted(removed))} of {base}"
        if removed
        else f"all {base} layers kept"
        if reshaped
        else f"all {base} layers (original)"
    )
    if reshaped:  # MLP width or sparsity, cut inside the kept layers
        summary += f" · {reshaped}"
    return (
        f'<div class="hubprune-layermap" data-removed="{",".join(map(str, sorted(removed)))}">'
        f'<div style="display:flex;gap:2px">{"".join(cells)}</div>'
        f'<div style="{_MUTED};font-size:0.8em;margin-top:3px">'
        f'<span style="color:{KEPT}">■</span> kept <span style="color:{REMOVED}">■</span> removed · '
        f"{html.escape(summary)}</div></div>"
    )


def diff_html(a: str, b: str, labels: tuple[str, str] = ("A", "B")) -> str:
    """Word-level differences between two answers: words only in A struck red, only in B green.

    Example: ``diff_html("Paris is big", "Paris is large")``
    """
    if not a.strip() and not b.strip():
        return f'<div style="{_MUTED}">No answers to compare yet.</div>'
    words_a, words_b = re.findall(r"\S+|\s+", a), re.findall(r"\S+|\s+", b)
    matcher = difflib.SequenceMatcher(a=words_a, b=words_b, autojunk=False)
    parts = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        left, right = html.escape("".join(words_a[i1:i2])), html.escape("".join(words_b[j1:j2]))
        if op == "equal":
            parts.append(left)
            continue
        if left:
            parts.append(
                f'<del class="only-a" title="only in {html.escape(labels[0])}" '
                f'style="background:#fde2e2;color:#9b1c1c">{left}</del>'
            )
        if right:
            parts.append(
                f'<ins class="only-b" title="only in {html.escape(labels[1])}" '
                f'style="background:#dcfce7;color:#166534;text-decoration:none">{right}</ins>'
            )
    same = matcher.ratio()
    head = (
        f'<div style="{_MUTED};font-size:0.85em;margin-bottom:6px" data-fig="similarity" data-value="{same:.4f}">'
        f'{same:.0%} of words shared · <span style="background:#fde2e2;color:#9b1c1c">only in '
        f'{html.escape(labels[0])}</span> · <span style="background:#dcfce7;color:#166534">'
        f"only in {html.escape(labels[1])}</span></div>"
    )
    body = f'<div style="white-space:pre-wrap;line-height:1.6">{"".join(parts)}</div>'
    return f'<div class="hubprune-diff">{head}{body}</div>'


def describe_layers(layers: list[int]) -> str:
    """``[13, 14, 15, 20]`` -> ``"layers 13-15, 20"`` (0-based, as everywhere in hubprune)."""
    if not layers:
        return "no layers"
    runs: list[str] = []
    start: int | None = layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(runs)


def human_count(n: int | None) -> str:
    """``134515008`` -> ``"134.5 M"``."""
    if n is None:
        return "n/a"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
