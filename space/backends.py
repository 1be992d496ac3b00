"""Where answers come from: one small interface, two implementations.

Every backend has ``stream(prompt, sampling)`` -> a ``TextStream`` (an iterator of text
chunks that also counts tokens) and ``info()`` -> ``ModelInfo`` (name, layers, parameters,
memory). ``OpenAIBackend`` talks to an OpenAI-compatible server (``hubprune serve``, vLLM)
with the official ``openai`` client; ``InProcessBackend`` loads the model with
``hubprune.loading.load_model`` and generates with transformers in a thread::

    backend = InProcessBackend("out/smollm2-24l", device="cpu")
    for chunk in backend.stream("What is the capital of France?", Sampling(max_tokens=32)):
        print(chunk, end="")
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

RECORD_FILE = "hubprune.json"  # as hubprune.record.RECORD_FILE; read here as plain JSON


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every panel. ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": self.seed}


@dataclass
class ModelInfo:
    """What a panel shows about its model. ``None`` / "n/a" where the backend cannot know."""

    name: str
    kind: str  # "in-process" or "server"
    layers: int | None = None  # decoder layers this model has
    base_layers: int | None = None  # decoder layers of its original (== layers for an original)
    removed_layers: list[int] = field(default_factory=list)  # 0-based, in the original's numbering
    base_model: str | None = None
    parameters: int | None = None
    memory: str = "n/a"
    chat_agreement: float | None = None  # top-1 agreement with the original's answers (hubprune eval --chat)
    reshaped: str | None = None  # what else was cut beside layers: MLP width, sparsity (``reshaped_text``)


class TextStream:
    """An answer as it arrives: iterate for text chunks; ``tokens`` counts tokens generated so far.

    ``close()`` asks the backend to stop generating (also called when iteration ends).
    """

    def __init__(self, chunks: Callable[[TextStream], Generator[str, None, None]]):
        self.tokens = 0
        self.stopped = threading.Event()
        self._chunks = chunks(self)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self.stopped.set()
        self._chunks.close()


class Backend:
    """The interface the app uses. Subclasses set ``name`` and implement both methods."""

    name: str

    def stream(self, prompt: str, sampling: Sampling) -> TextStream:
        raise NotImplementedError

    def info(self) -> ModelInfo:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# In-process: transformers in this process


class InProcessBackend(Backend):
    """A model loaded in this process (Hub id, folder or .gguf), streamed with ``TextIteratorStreamer``.

    Example: ``InProcessBackend("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")``
    """

    def __init__(
        self, source: str | os.PathLike, *, name: str | None = None, device: str = "auto", dtype: str = "float32"
    ):
        from hubprune.loading import load_model

        self.source = os.fspath(source)
        self.name = name or display_name(self.source)
        logger.info("loading %s in process (%s)", self.source, device)
        self.model, self.tokenizer, self.origin = load_model(self.source, dtype=dtype, device=device)
        self._facts = _model_facts(self.source, self.origin)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def info(self) -> ModelInfo:
        layers = self.model.config.get_text_config().num_hidden_layers
        return ModelInfo(
            name=self.name,
            kind="in-process",
            layers=layers,
            base_layers=self._facts.get("base_layers", layers),
            removed_layers=self._facts.get("removed_layers", []),
            base_model=self._facts.get("base_model") or self.origin.base_model,
            parameters=self.parameters,
            memory=self._memory(),
            chat_agreement=self._facts.get("chat_agreement"),
            reshaped=self._facts.get("reshaped"),
        )

    def _memory(self) -> str:
        import torch

        from_weights = f"weights {human_bytes(self.weight_bytes)}"
        if self.model.device.type == "cuda":
            return f"{from_weights} · CUDA allocated {human_bytes(torch.cuda.memory_allocated(self.model.device))}"
        rss = process_rss()
        return f"{from_weights} · process RSS {human_bytes(rss)} (all in-process models)" if rss else from_weights

    def stream(self, prompt: str, sampling: Sampling) -> TextStream:
        return TextStream(lambda out: self._chunks(prompt, sampling, out))

    def _chunks(self, prompt: str, sampling: Sampling, out: TextStream) -> Generator[str, None, None]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        inputs = self._encode(prompt)
        streamer = _counting_streamer_class()(self.tokenizer, out, skip_prompt=True, skip_special_tokens=True)
        generation, eos = self.model.generation_config, self.tokenizer.eos_token_id
        config = GenerationConfig(
            max_new_tokens=sampling.max_tokens,
            do_sample=False,
            bos_token_id=generation.bos_token_id,
            eos_token_id=generation.eos_token_id if generation.eos_token_id is not None else eos,
            pad_token_id=generation.pad_token_id if generation.pad_token_id is not None else eos,
        )
        # Sampling draws from a per-request generator, so two panels streaming at once stay reproducible
        # (transformers' own sampling uses the process-wide RNG, which concurrent threads would share).
        processors = LogitsProcessorList([_SeededSampling(sampling)] if sampling.temperature > 0 else [])
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **inputs,
                        generation_config=config,
                        logits_processor=processors,
                        stopping_criteria=StoppingCriteriaList([_StopWhen(out.stopped)]),
                        streamer=streamer,
                    )
            except BaseException as err:  # reported to the consumer below, not lost in the thread
                errors.append(err)
                streamer.end()

        worker = threading.Thread(target=generate, name=f"hubprune-space-{self.name}", daemon=True)
        worker.start()
        try:
            for text in streamer:
                if text:
                    yield text
            if errors:
                raise RuntimeError(f"generation failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
        finally:
            out.stopped.set()
            worker.join(timeout=5)

    def _encode(self, prompt: str) -> dict:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            enc = tok.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_dict=True,
                return_tensors="pt",
            )
        else:  # a base model: the prompt as plain text
            enc = tok(prompt, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@functools.lru_cache(maxsize=1)
def _counting_streamer_class():
    """``TextIteratorStreamer`` that also counts generated tokens (built on first use: transformers is heavy)."""
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        def __init__(self, tokenizer, out: TextStream, **kwargs):
            super().__init__(tokenizer, timeout=600, **kwargs)
            self.out = out
            self._prompt_seen = False

        def put(self, value) -> None:
            if self._prompt_seen:  # the first call carries the prompt
                self.out.tokens += int(value.numel())
            self._prompt_seen = True
            super().put(value)

    return CountingStreamer


class _SeededSampling:
    """Temperature + top-p sampling with its own ``torch.Generator``; leaves only the drawn token."""

    def __init__(self, sampling: Sampling):
        import torch

        self.temperature, self.top_p = sampling.temperature, sampling.top_p
        self.generator = torch.Generator().manual_seed(sampling.seed)

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()  # (batch, vocab)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p  # the first token always stays
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        choice = torch.multinomial(probs, 1, generator=self.generator).to(scores.device)  # (batch, 1)
        return torch.full_like(scores, float("-inf")).scatter(-1, choice, 0.0)


class _StopWhen:
    """Stops ``generate`` once ``event`` is set (the reader went away or the user cleared)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# ---------------------------------------------------------------------------------------------
# An OpenAI-compatible server


class OpenAIBackend(Backend):
    """One model of an OpenAI-compatible server, streamed through the official ``openai`` client.

    ``base_url`` defaults to ``$HUBPRUNE_SERVER_URL``; the key comes from ``api_key``,
    ``$HUBPRUNE_API_KEY`` or ``$OPENAI_API_KEY``. ``folder`` (a local copy of the model), when
    given, supplies layers and parameters the server does not report.

    Example: ``OpenAIBackend("smollm2-24l", "http://127.0.0.1:8000/v1", folder="out/smollm2-24l")``
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        name: str | None = None,
        folder: str | os.PathLike | None = None,
        timeout: float = 120.0,
    ):
        from openai import OpenAI

        base_url = base_url or os.environ.get("HUBPRUNE_SERVER_URL")
        if not base_url:
            raise ValueError("no server URL: pass base_url (e.g. http://127.0.0.1:8000/v1) or set HUBPRUNE_SERVER_URL")
        self.model, self.name = model, name or model
        self.base_url = normalise_base_url(base_url)
        self.folder = Path(folder) if folder else None
        key = api_key or os.environ.get("HUBPRUNE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self._headers = {"Authorization": f"Bearer {key}"}
        self.client = OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout)
        self._facts: dict | None = None
        self._chat = True  # False once the server said the model has no chat template
        self.known: dict = {}  # facts learnt elsewhere (a pruned copy's record), below what the server says

    def stream(self, prompt: str, sampling: Sampling) -> TextStream:
        return TextStream(lambda out: self._chunks(prompt, sampling, out))

    def _chunks(self, prompt: str, sampling: Sampling, out: TextStream) -> Generator[str, None, None]:
        import openai

        try:
            response = self._request(prompt, sampling)
            with response:
                exact = False
                for chunk in response:
                    if chunk.usage is not None and chunk.usage.completion_tokens is not None:
                        out.tokens, exact = chunk.usage.completion_tokens, True
                    for choice in chunk.choices:
                        text = choice.delta.content if hasattr(choice, "delta") else choice.text
                        if text:
                            if not exact:
                                out.tokens += 1  # one chunk per token until the server reports usage
                            yield text
                    if out.stopped.is_set():
                        return
        except openai.APIConnectionError as err:
            raise ConnectionError(f"cannot reach the server at {self.base_url} ({_cause(err)})") from None
        except openai.APIStatusError as err:
            raise RuntimeError(f"the server answered {err.status_code}: {_openai_error_message(err)}") from None

    def _request(self, prompt: str, sampling: Sampling):
        """A streamed chat completion; a plain completion for a model without a chat template (a base model)."""
        import openai

        options: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "seed": sampling.seed,
            "stream_options": {"include_usage": True},
        }
        if self._chat:
            try:
                return self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **options)
            except openai.BadRequestError as err:
                if "chat template" not in _openai_error_message(err).lower():
                    raise
                logger.info("%s has no chat template: sending prompts as plain text to /completions", self.model)
                self._chat = False
        return self.client.completions.create(prompt=prompt, **options)

    def info(self) -> ModelInfo:
        facts = self._static_facts()
        return ModelInfo(
            name=self.name,
            kind="server",
            layers=facts.get("layers"),
            base_layers=facts.get("base_layers"),
            removed_layers=facts.get("removed_layers", []),
            base_model=facts.get("base_model"),
            parameters=facts.get("parameters"),
            memory=self._memory(facts),
            chat_agreement=facts.get("chat_agreement"),
            reshaped=facts.get("reshaped"),
        )

    def _static_facts(self) -> dict:
        if self._facts is None:
            facts = folder_facts(self.folder) if self.folder and self.folder.is_dir() else {}
            served = self._get_json("/models")
            for entry in (served or {}).get("data", []):
                extra = entry.get("hubprune") if entry.get("id") == self.model else None
                if isinstance(extra, dict):  # facts the server adds beside the OpenAI fields, if any
                    extra = {
                        "layers": extra.get("num_layers"),
                        "base_layers": extra.get("base_num_layers"),
                        "reshaped": reshaped_text(extra),
                        **extra,
                    }
                    for key in (
                        "layers",
                        "base_layers",
                        "removed_layers",
                        "base_model",
                        "parameters",
                        "chat_agreement",
                        "reshaped",
                    ):
                        if extra.get(key) is not None:
                            facts.setdefault(key, extra[key])
            for key, value in self.known.items():
                if value is not None:
                    facts.setdefault(key, value)
            if facts.get("layers") is not None:
                facts.setdefault("base_layers", facts["layers"])
            self._facts = facts if served is not None else None  # ask the server again next time if it was down
            return facts
        return self._facts

    def _memory(self, facts: dict) -> str:
        parts = []
        metrics = self._get_text(server_root(self.base_url) + "/metrics")
        if metrics is None and not facts.get("disk_bytes"):
            return "n/a (the server's /metrics did not answer)"
        memory = memory_from_metrics(metrics, self.model) if metrics else None
        if memory is not None:
            parts.append(f"server reports {human_bytes(memory)}")
        if facts.get("disk_bytes"):
            parts.append(f"weights on disk {human_bytes(facts['disk_bytes'])}")
        return " · ".join(parts) or "n/a (the server reports no memory figure)"

    def _get_json(self, path: str) -> dict | None:
        text = self._get_text(self.base_url + path)
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def _get_text(self, url: str) -> str | None:
        import httpx

        try:
            response = httpx.get(url, headers=self._headers, timeout=2.0)
            return response.text if response.status_code == 200 else None
        except httpx.HTTPError:
            return None


# ---------------------------------------------------------------------------------------------
# Helpers


def make_backends(
    models: list[str], server_url: str | None = None, *, device: str = "auto", api_key: str | None = None
) -> list[Backend]:
    """Backends for ``models`` (paths, Hub ids or ``NAME=PATH``): on ``server_url`` if given, else in process.

    Example: ``make_backends(["HuggingFaceTB/SmolLM2-135M-Instruct", "out/smollm2-24l"], device="cpu")``
    """
    specs = model_specs(models)
    if server_url:
        backends = [
            OpenAIBackend(name, server_url, api_key=api_key, name=name, folder=path if Path(path).is_dir() else None)
            for name, path in specs
        ]
        _originals_from_records(backends, [path for _, path in specs])
        return list(backends)  # list[Backend]
    return [InProcessBackend(path, name=name, device=device) for name, path in specs]


def _originals_from_records(backends: list[OpenAIBackend], paths: list[str]) -> None:
    """An original served by Hub id has no local folder: its pruned copies' records know its size."""
    records = [folder_facts(Path(p)) for p in paths if Path(p).is_dir()]
    for backend, path in zip(backends, paths):
        known = next((r for r in records if r.get("base_model") == path), None)
        if backend.folder is None and known:
            backend.known = {
                "layers": known["base_layers"],
                "base_layers": known["base_layers"],
                "base_model": path,
                "parameters": known.get("base_parameters"),
            }


def model_specs(models: list[str]) -> list[tuple[str, str]]:
    """(name, path) of each of two or more models with distinct names; ValueError otherwise."""
    if len(models) < 2:
        raise ValueError(
            f"compare needs two or more models (the original and a pruned copy), got {len(models)}: {models}"
        )
    specs = [parse_model(m) for m in models]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ, got {names}; name them NAME=PATH")
    return specs


def parse_model(text: str) -> tuple[str, str]:
    """``PATH`` or ``NAME=PATH`` -> (name, path); the name is what a server routes by.

    Example: ``parse_model("small=out/smollm2-24l") == ("small", "out/smollm2-24l")``
    """
    name, sep, path = text.partition("=")
    if sep and name and path and "/" not in name:
        return name, path
    return display_name(text), text


def display_name(source: str) -> str:
    """A folder's or file's name, or the Hub id itself (how ``hubprune serve`` names models)."""
    path = Path(source).expanduser()
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return source


def folder_facts(folder: Path) -> dict:
    """Layers, removed layers, base model, parameters and weight bytes read from a model folder's files."""
    facts: dict = {}
    record = folder / RECORD_FILE
    if record.is_file():
        facts.update(record_facts(json.loads(record.read_text())))
    elif (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        layers = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
        if layers:
            facts.update(layers=layers, base_layers=layers)
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        facts["disk_bytes"] = sum(p.stat().st_size for p in shards)
        facts.setdefault("parameters", _safetensors_parameters(shards))
    return facts


def record_facts(record: dict) -> dict:
    """The facts a ``hubprune.json`` record gives: layers kept of the original, which were removed, parameters."""
    facts = {
        "layers": len(record["kept_layers"]),
        "base_layers": record["base_num_layers"],
        "removed_layers": list(record["removed_layers"]),
        "base_model": record.get("base_model"),
    }
    if record.get("parameters_after"):
        facts["parameters"] = record["parameters_after"]
    if record.get("parameters_before"):
        facts["base_parameters"] = record["parameters_before"]
    chat = (record.get("evaluation") or {}).get("chat") or {}
    if chat.get("top1_agreement") is not None:
        facts["chat_agreement"] = chat["top1_agreement"]
    if reshaped := reshaped_text(record):
        facts["reshaped"] = reshaped
    return facts


def reshaped_text(record: dict) -> str | None:
    """What a record says was cut beside whole layers, in a few words; None if nothing.

    Example: ``reshaped_text({"width": {"intermediate_size_before": 1536, "intermediate_size_after": 1152},
    "sparsity": {"target": "2:4", "method": "wanda"}})`` -> ``"MLP width 1536 → 1152 · 2:4 sparse (wanda)"``
    """
    parts = []
    width = record.get("width") or {}
    if width.get("intermediate_size_after"):
        parts.append(f"MLP width {width['intermediate_size_before']} → {width['intermediate_size_after']}")
    sparsity = record.get("sparsity") or {}
    if sparsity.get("target"):
        target = str(sparsity["target"])
        shown = target if ":" in target else f"{float(target):.0%}"
        parts.append(f"{shown} sparse ({sparsity.get('method', 'n/a')})")
    return " · ".join(parts) or None


def _model_facts(source: str, origin) -> dict:
    """Facts of a loaded model: from its folder, or from the ``hubprune.json`` of its Hub repo (if it has one)."""
    if Path(source).is_dir():
        return folder_facts(Path(source))
    if origin.kind != "hub":
        return {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        path = hf_hub_download(origin.base_model, RECORD_FILE, revision=origin.revision)
    except (EntryNotFoundError, HfHubHTTPError, OSError):
        return {}  # an original: no record
    return record_facts(json.loads(Path(path).read_text()))


def _safetensors_parameters(shards: list[Path]) -> int | None:
    """Parameters stored in safetensors files, read from their headers only."""
    from math import prod

    total = 0
    for shard in shards:
        with shard.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        total += sum(prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total or None


def memory_from_metrics(text: str, model: str) -> int | None:
    """A memory figure in bytes for ``model`` from Prometheus text, if the server exports one."""
    pattern = re.compile(r"^(\w*(?:memory|rss)\w*bytes\w*)\{([^}]*)\}\s+([0-9.eE+]+)\s*$", re.MULTILINE)
    for _name, labels, value in pattern.findall(text):
        if f'model="{model}"' in labels:
            return int(float(value))
    return None


def normalise_base_url(url: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1/`` -> ``http://host:8000/v1``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"server URL {url!r} must look like http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def server_root(base_url: str) -> str:
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def process_rss() -> int | None:
    """This process's resident memory in bytes (psutil, else /proc), or None where neither works."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def human_bytes(n: int | float | None) -> str:
    """``1536 * 2**20`` -> ``"1.5 GiB"``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cause(err: BaseException) -> str:
    cause = err.__cause__ or err.__context__
    return f"{type(cause).__name__}: {cause}" if cause else str(err)


def _openai_error_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if message:
            return str(message)
    return str(err).splitlines()[0]
