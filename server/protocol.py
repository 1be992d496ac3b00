"""OpenAI request checks and response shapes shared by the router and the engines.

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``.

Example::

    params = check_request("chat", {"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from starlette.responses import JSONResponse

ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as vLLM's OpenAI server takes (torch takes more)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client with an HTTP status. Example: ``APIError(400, "bad", param="top_p")``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_param(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@dataclass
class Sampling:
    """The generation settings of one request, after checks."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def check_request(route: str, body: dict) -> Sampling:
    """Check the fields every engine understands the same way; raise APIError(400) naming the field."""
    if route == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_param("messages", 'messages must be a non-empty list of {"role", "content"} objects')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad_param(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role'")
    elif "prompt" not in body or not isinstance(body["prompt"], (str, list)):
        raise bad_param("prompt", "prompt must be a string (or a list of strings or token ids)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise bad_param(param, f"{param} must be an integer >= 1, got {max_tokens!r}")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad_param("top_p", "top_p must be in (0, 1], got 0")
    for key in ("presence_penalty", "frequency_penalty"):
        _number(body, key, 0.0, -2.0, 2.0)
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n < 1):
        raise bad_param("n", f"n must be an integer >= 1, got {n!r}")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise bad_param("seed", f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed!r}")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_param("stop", "stop must be a non-empty string or a list of non-empty strings")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_param("stream", f"stream must be true or false, got {stream!r}")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_param("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad_param("stream_options", 'stream_options must be an object such as {"include_usage": true}')
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        stream=bool(stream),
        include_usage=bool((options or {}).get("include_usage")),
    )


def completion_id(route: str) -> str:
    return ("chatcmpl-" if route == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def chunk(
    route: str, rid: str, model: str, created: int, text: str | None, finish: str | None, first: bool = False
) -> dict:
    """One streamed ``chat.completion.chunk`` or ``text_completion`` object."""
    if route == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def full_response(route: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole (non-streamed) ``chat.completion`` or ``text_completion`` object."""
    if route == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": completion_id(route),
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: {...}`` and a blank line."""
    return b"data: " + (data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))).encode() + b"\n\n"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_param(key, f"{key} must be a number in [{low:g}, {high:g}], got {value!r}")
    if not low <= value <= high:
        raise bad_param(key, f"{key} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)
