"""The embedded engine: a transformers model generating in a worker thread of this process.

The worker takes the requests waiting for its model (up to ``max_num_seqs``) as one batch,
left-padded, and decodes them together with one KV cache, dropping each row as it finishes;
requests that arrive meanwhile wait for the next batch (the router bounds how many wait).
Every request has its own seeded generator, its own stop strings and exact token counts.

Example::

    engine = TransformersEngine(ModelSpec(path="out/smollm2-24l"), folder="out/smollm2-24l", device="cpu")
    await engine.start()
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.responses import JSONResponse, Response, StreamingResponse

from hubprune.generation import left_pad
from hubprune.loading import NO_HUB_KERNELS, load_model, resolve_device
from hubprune.server.config import BNB_QUANTIZATION, ModelSpec
from hubprune.server.engine import Engine
from hubprune.server.metrics import RequestStats
from hubprune.server.protocol import APIError, Sampling, bad_param, chunk, completion_id, full_response, sse, usage

logger = logging.getLogger(__name__)
_GATHER_GAP, _GATHER_MAX = 0.003, 0.02  # seconds: a batch waits for more while they keep arriving
_LOADING = threading.Lock()  # from_pretrained is not thread-safe (it patches torch globals while loading)

_KNOWN = {
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "echo",
    "best_of",
    "suffix",
    "tools",
    "tool_choice",
    "response_format",
    "parallel_tool_calls",
    "metadata",
    "store",
    "ignore_eos",
}  # ignore_eos: vLLM's, for benchmarks
# Fields this engine accepts only at their neutral value.
_NEUTRAL: dict[str, list] = {
    "n": [1],
    "presence_penalty": [0],
    "frequency_penalty": [0],
    "logprobs": [False, 0],
    "top_logprobs": [0],
    "logit_bias": [{}],
    "echo": [False],
    "best_of": [1],
    "suffix": [""],
    "tools": [[]],
    "tool_choice": ["none", "auto"],
    "response_format": [{"type": "text"}],
}


def check_quantization(spec: ModelSpec, device: str) -> None:
    """Refuse a quantization this engine cannot load here, before anything starts."""
    q = spec.quantization
    if q is None:
        return
    if q not in BNB_QUANTIZATION:
        raise ValueError(
            f"model {spec.name}: quantization {q!r} is a vLLM method; the transformers engine loads "
            f"{' or '.join(BNB_QUANTIZATION)} (bitsandbytes), or serve it with --engine vllm"
        )
    if resolve_device(device).type != "cuda":
        raise ValueError(
            f"model {spec.name}: {q} loading (bitsandbytes) needs a CUDA GPU and this machine has none; "
            "remove quantization, or serve on a GPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"model {spec.name}: {q} loading needs bitsandbytes: pip install bitsandbytes") from None


@dataclass(eq=False)
class _Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stats: RequestStats
    loop: asyncio.AbstractEventLoop
    ignore_eos: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class TransformersEngine(Engine):
    """One transformers model in this process (Hub id, folder or GGUF; 8/4-bit with bitsandbytes on CUDA)."""

    kind = "transformers"
    max_model_len: int  # the model's context, known once start() has loaded it

    def __init__(self, spec: ModelSpec, folder: str, device: str = "auto"):
        super().__init__(spec.name, spec.max_model_len)
        self.spec, self.folder, self.device = spec, folder, resolve_device(device)
        self.model: Any = None  # a transformers model and tokenizer, loaded by start()
        self.tokenizer: Any = None
        self.eos_ids: set[int] = set()
        self._tok_lock = threading.Lock()  # the worker's detokenizers share the tokenizer
        self._encoder: Any = None  # a copy of the tokenizer for requests: a long prompt stalls no stream
        self._enc_lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve_batches, name=f"hubprune-{spec.name}", daemon=True)
        self._jobs: set[_Job] = set()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._worker.start()

    def _load(self) -> None:
        spec = self.spec
        check_quantization(spec, str(self.device))
        with _LOADING:
            if spec.quantization:
                self.model, self.tokenizer = self._load_quantized()
            else:
                dtype = "float32" if spec.dtype == "auto" and self.device.type == "cpu" else spec.dtype
                self.model, self.tokenizer, _ = load_model(
                    self.folder,
                    revision=spec.revision,
                    dtype=dtype,
                    device=str(self.device),
                    trust_remote_code=spec.trust_remote_code,
                )
        config = self.model.config.get_text_config()
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(spec.max_model_len or limit, limit)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {
            t for t in ([eos] if isinstance(eos, int) else eos or []) + [self.tokenizer.eos_token_id] if t is not None
        }
        self.pad_id = next((t for t in (self.tokenizer.pad_token_id, *sorted(self.eos_ids)) if t is not None), 0)
        self._encoder = copy.deepcopy(self.tokenizer)
        logger.info(
            "%s: loaded %s on %s (%d layers, context %d)",
            self.name,
            self.folder,
            self.device,
            config.num_hidden_layers,
            self.max_model_len,
        )

    def _load_quantized(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        if self.spec.quantization == "8bit":
            qc = BitsAndBytesConfig(load_in_8bit=True)
        else:
            qc = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        kwargs = {"trust_remote_code": self.spec.trust_remote_code, "revision": self.spec.revision}
        model = AutoModelForCausalLM.from_pretrained(
            self.folder,
            quantization_config=qc,
            use_safetensors=True,
            device_map={"": self.device.index or 0},
            **NO_HUB_KERNELS,
            **kwargs,
        )
        return model.eval(), AutoTokenizer.from_pretrained(self.folder, **kwargs)

    async def handle(self, route: str, body: dict, sampling: Sampling, stats: RequestStats) -> Response:
        _check_supported(body)
        prompt_ids = await asyncio.to_thread(self._encode, route, body)  # off the event loop: MBs take seconds
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt is "
                f"{len(prompt_ids)} tokens. Shorten the prompt, or serve the model with a longer "
                "max_model_len.",
                param="messages" if route == "chat" else "prompt",
                code="context_length_exceeded",
            )
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise bad_param(
                "max_tokens",
                f"max_tokens={sampling.max_tokens} does not fit: the prompt is "
                f"{len(prompt_ids)} tokens of a {self.max_model_len}-token context; ask for at most {room}",
            )
        loop = asyncio.get_running_loop()
        job = _Job(prompt_ids, sampling.max_tokens or room, sampling, stats, loop, body.get("ignore_eos") is True)
        self._jobs.add(job)
        self._queue.put(job)
        if sampling.stream:
            return StreamingResponse(self._sse(route, job), media_type="text/event-stream")
        try:
            parts, finish, n = [], "length", 0
            while True:
                event = await job.queue.get()
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "done":
                    finish, n = event[1], event[2]
                    break
                else:
                    raise APIError(500, f"generation failed: {event[1]}", code="engine_error")
        finally:
            job.cancelled = True
            self._jobs.discard(job)
        stats.finish(len(prompt_ids), n)
        return JSONResponse(full_response(route, self.name, "".join(parts), finish, len(prompt_ids), n))

    async def _sse(self, route: str, job: _Job):
        rid, created, first = completion_id(route), int(time.time()), True
        try:
            while True:
                event = await job.queue.get()
                if event[0] == "text":
                    yield sse(chunk(route, rid, self.name, created, event[1], None, first))
                    first = False
                elif event[0] == "done":
                    if first and route == "chat":
                        yield sse(chunk(route, rid, self.name, created, "", None, first=True))
                    yield sse(chunk(route, rid, self.name, created, None, event[1]))
                    if job.sampling.include_usage:
                        yield sse(
                            {
                                "id": rid,
                                "object": chunk(route, rid, "", 0, None, None)["object"],
                                "created": created,
                                "model": self.name,
                                "choices": [],
                                "usage": usage(len(job.prompt_ids), event[2]),
                            }
                        )
                    job.stats.finish(len(job.prompt_ids), event[2])  # counted before the client sees the end
                    yield sse("[DONE]")
                    return
                else:
                    yield sse(APIError(500, f"generation failed: {event[1]}", code="engine_error").body())
                    job.stats.finish(status=500)
                    yield sse("[DONE]")
                    return
        finally:
            job.cancelled = True
            self._jobs.discard(job)
            job.stats.finish(status=499)  # the client went away before the end (no-op when finished)

    def _serve_batches(self) -> None:
        """The worker thread: take what waits (up to max_num_seqs) and decode it as one batch, until closed.

        A batch waits for more requests while they keep coming (3 ms apart, 20 ms at most)."""
        while (job := self._queue.get()) is not None:
            batch, deadline = [job], time.monotonic() + _GATHER_MAX
            while len(batch) < self.spec.max_num_seqs:  # requests sent together arrive a few ms apart
                try:
                    more = self._queue.get(timeout=max(0.0, min(_GATHER_GAP, deadline - time.monotonic())))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            batch = [j for j in batch if not j.cancelled]
            if batch:
                self._generate(batch)

    @torch.inference_mode()
    def _generate(self, jobs: list[_Job]) -> None:
        """Decode ``jobs`` together; each emits ("text", delta)..., then ("done", finish, n) or ("error", msg)."""
        from transformers import DynamicCache

        rows: list[_Row] = []
        try:
            rows = [_Row(job, self) for job in jobs]  # inside the try: a row that cannot start fails its batch only
            ids, mask = left_pad([j.prompt_ids for j in jobs], self.pad_id, self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache(config=self.model.config)
            active, step_ids = rows, ids
            while True:
                # one sequence alone runs unpadded, without a mask: the same numbers as a single-request loop
                extra = (
                    {"attention_mask": mask, "position_ids": positions[:, -step_ids.shape[1] :]}
                    if len(rows) > 1
                    else {}
                )
                logits = self.model(
                    input_ids=step_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra
                ).logits[:, -1]  # [batch, vocab]
                tokens = [row.sample(logits[i]) for i, row in enumerate(active)]
                keep = [i for i, (row, t) in enumerate(zip(active, tokens)) if row.step(t)]
                if not keep:
                    return
                if len(keep) < len(active):  # drop finished rows from the batch and the cache
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, positions, active = mask[index], positions[index], [active[i] for i in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                positions = positions[:, -1:] + 1
                step_ids = torch.tensor([[tokens[i]] for i in keep], device=self.device)
        except Exception as err:  # reported to each client; the engine keeps serving
            logger.exception("%s: generation failed", self.name)
            done = {id(row.job) for row in rows if row.finished}
            for job in jobs:
                if id(job) not in done:
                    job.emit(("error", f"{type(err).__name__}: {err}"))

    def _encode(self, route: str, body: dict) -> list[int]:
        tok = self._encoder
        if route == "chat":
            if not getattr(tok, "chat_template", None):
                raise APIError(
                    400,
                    f"model {self.name} has no chat template; send a prompt to /v1/completions",
                    param="messages",
                    code="no_chat_template",
                )
            messages = [{**m, "content": _text_of(m.get("content"), i)} for i, m in enumerate(body["messages"])]
            try:
                with self._enc_lock:
                    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # jinja raises for messages the template refuses (e.g. wrong role order)
                raise bad_param("messages", f"the chat template refused these messages: {err}") from None
            with self._enc_lock:
                return tok(text, add_special_tokens=False)["input_ids"]
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            with self._enc_lock:
                return tok(prompt, add_special_tokens=True)["input_ids"]
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tok) for t in prompt):
            return list(prompt)
        raise bad_param(
            "prompt",
            "the transformers engine takes one prompt per request: a string, or a list of "
            f"token ids in [0, {len(tok)})",
        )

    async def count_tokens(self, text: str) -> int:
        def count() -> int:
            with self._enc_lock:
                return len(self._encoder(text, add_special_tokens=True)["input_ids"])

        return await asyncio.to_thread(count)

    async def health(self) -> bool:
        return self.model is not None and self._worker.is_alive()

    async def close(self) -> None:
        for job in list(self._jobs):
            job.cancelled = True
        self._queue.put(None)
        if self._worker.is_alive():
            await asyncio.to_thread(self._worker.join, 30)
        self.model = None


class _Row:
    """One request's state inside a batch: its generator, detokenizer and token count."""

    def __init__(self, job: _Job, engine: TransformersEngine):
        self.job, self.eos_ids = job, set() if job.ignore_eos else engine.eos_ids
        s = job.sampling
        self.generator = torch.Generator(device=engine.device)
        self.generator.manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
        self.text = _Detokenizer(engine.tokenizer, s.stop, engine._tok_lock)
        self.count, self.finished = 0, False

    def sample(self, logits: torch.Tensor) -> int:
        return sample(logits, self.job.sampling.temperature, self.job.sampling.top_p, self.generator)

    def step(self, token: int) -> bool:
        """Take one sampled token; False once this request is finished."""
        if self.job.cancelled:
            self.finished = True
            return False
        self.count += 1
        if self.count == 1:
            self.job.stats.first_token()
        if token in self.eos_ids:
            return self._finish("stop")
        delta, stopped = self.text.add(token)
        if delta:
            self.job.emit(("text", delta))
        if stopped:
            return self._finish("stop")
        return True if self.count < self.job.max_tokens else self._finish("length")

    def _finish(self, reason: str) -> bool:
        rest = self.text.flush()  # text held back for a stop string that never came
        if rest:
            self.job.emit(("text", rest))
        self.job.emit(("done", reason, self.count))
        self.finished = True
        return False


GREEDY_BELOW = 1e-5  # temperatures below this are greedy, as in vLLM


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from ``logits`` [vocab]: greedy at temperature 0 (below 1e-5), else nucleus sampling.

    Example: ``sample(torch.tensor([0.1, 2.0, 0.3]), 0.0, 1.0, torch.Generator()) == 1``
    """
    if temperature < GREEDY_BELOW:  # logits / 1e-300 would overflow to inf and NaN probabilities
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
        keep[0] = True  # the most likely token always (a top_p below float32's range would keep none)
        return int(order[torch.multinomial(sorted_probs * keep, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class _Detokenizer:
    """Token ids -> text deltas, append-only; holds back text that may begin a stop string."""

    def __init__(self, tokenizer, stops: list[str], lock: threading.Lock):
        self.tokenizer, self.stops, self.lock = tokenizer, stops, lock
        self.ids: list[int] = []
        self.prefix = self.read = self.sent = 0
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        self._decode(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._decode(final=True)
        return self._release(final=True)[0]

    def _decode(self, final: bool) -> None:
        with self.lock:
            before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):  # wait for whole characters
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def _release(self, final: bool) -> tuple[str, bool]:
        cut = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i != -1), default=None)
        if cut is not None:
            out, self.sent, self.stopped = self.text[self.sent : cut], cut, True
            return out, True
        end = len(self.text) if final else len(self.text) - self._partial_stop()
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out, False

    def _partial_stop(self) -> int:
        """Length of the longest tail of the unsent text that is the start of a stop string."""
        tail = self.text[self.sent :]
        return max(
            (k for s in self.stops for k in range(1, min(len(s), len(tail) + 1)) if tail.endswith(s[:k])), default=0
        )


def _check_supported(body: dict) -> None:
    for key, value in body.items():
        if key not in _KNOWN:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
        if key in _NEUTRAL and value is not None and value not in _NEUTRAL[key]:
            raise bad_param(
                key,
                f"{key}={value!r} is not supported by the transformers engine; leave it out "
                "(or serve with --engine vllm)",
            )


def _text_of(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise bad_param(
        f"messages[{i}].content",
        f"messages[{i}].content must be a string or a list of text parts "
        '({"type": "text", "text": ...}); images and audio are not supported',
    )
