"""The router: one OpenAI-compatible endpoint in front of several engines, by the request's ``model``.

Routes: ``GET /health``, ``GET /metrics`` (open), and with the API key when one is set:
``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /tokenize``. Every error is OpenAI-shaped.

Example::

    app = create_app({"tiny": engine}, api_key="sk-local", max_queue={"tiny": 8})
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time

import anyio
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from hubprune.server.engine import Engine
from hubprune.server.metrics import CONTENT_TYPE, Metrics
from hubprune.server.protocol import APIError, bad_param, check_request, sse

logger = logging.getLogger(__name__)
_DRAIN_LIMIT = 64 * 2**20  # an oversized body is read and dropped up to this much, so the 413 reaches the client
MAX_DEPTH = 32  # JSON nesting a request may have (a chat request needs 4)


def create_app(
    engines: dict[str, Engine],
    *,
    api_key: str | None = None,
    max_body_bytes: int = 4 * 2**20,
    max_queue: dict[str, int] | None = None,
    metrics: Metrics | None = None,
    info: dict[str, dict] | None = None,
    shutdown_grace: float = 10.0,
) -> FastAPI:
    """The FastAPI app routing to ``engines`` (already started) by model name.

    ``begin_shutdown(app)`` (called on SIGTERM/SIGINT) gives the requests in flight ``shutdown_grace``
    seconds; then streams end with an error event and waiting requests get a JSON 503."""
    app = FastAPI(title="hubprune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics = metrics or Metrics()
    app.state.shutdown_grace, app.state.stopping, app.state.grace_over = shutdown_grace, False, asyncio.Event()
    limits = {name: (max_queue or {}).get(name, 64) for name in engines}
    in_flight = dict.fromkeys(engines, 0)
    created = int(time.time())

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401, "Missing API key: send the header 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def engine_for(name) -> Engine:
        if not isinstance(name, str) or not name:
            raise bad_param("model", f"model is required: one of {sorted(engines)}")
        if name not in engines:
            raise APIError(
                404,
                f"The model `{name}` does not exist. Served models: {', '.join(sorted(engines))}.",
                param="model",
                code="model_not_found",
            )
        return engines[name]

    def card(name: str) -> dict:
        e = engines[name]
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "hubprune",
            "max_model_len": e.max_model_len,
            "hubprune": {**e.describe(), **(info or {}).get(name, {})},
        }

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return APIError(
            500, f"internal error ({type(err).__name__}); the server log has the details", code="internal_error"
        ).response()

    @app.get("/health")
    @_answers_errors
    async def health() -> JSONResponse:
        states = {name: await e.health() for name, e in engines.items()}
        ok = all(states.values())
        return JSONResponse({"status": "ok" if ok else "unhealthy", "models": states}, status_code=200 if ok else 503)

    @app.get("/metrics")
    @_answers_errors
    async def prometheus() -> Response:
        for name, n in in_flight.items():
            metrics.in_flight.labels(name).set(n)
        texts = await asyncio.gather(*(e.metrics_text() for e in engines.values()), return_exceptions=True)
        passed = {name: t for name, t in zip(engines, texts) if isinstance(t, str)}
        return Response(metrics.render(passed), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    @_answers_errors
    async def list_models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [card(name) for name in engines]}

    @app.get("/v1/models/{name:path}")
    @_answers_errors
    async def get_model(name: str, request: Request) -> dict:
        authorize(request)
        engine_for(name)
        return card(name)

    @app.post("/tokenize")
    @_answers_errors
    async def tokenize(request: Request) -> dict:
        authorize(request)
        body = await read_json(request, max_body_bytes)
        engine = engine_for(body.get("model"))
        if not isinstance(body.get("prompt"), str):
            raise bad_param("prompt", "prompt must be a string")
        return {"count": await engine.count_tokens(body["prompt"]), "max_model_len": engine.max_model_len}

    async def complete(route: str, request: Request):
        authorize(request)
        body = await read_json(request, max_body_bytes)
        engine = engine_for(body.get("model"))
        name = engine.name
        sampling = check_request(route, body)
        stats = metrics.request(name, route)
        if in_flight[name] >= limits[name]:
            stats.finish(status=429)
            raise APIError(
                429,
                f"model {name} has {in_flight[name]} requests running or queued (the limit is "
                f"{limits[name]}, max_queue); retry later",
                code="overloaded",
            )
        in_flight[name] += 1

        def release() -> None:
            in_flight[name] -= 1

        try:
            response = await _until_left_or_stopped(engine.handle(route, body, sampling, stats), request, app)
        except APIError as err:
            stats.finish(status=err.status)
            release()
            raise
        except BaseException:
            stats.finish(status=500)
            release()
            raise
        if response is None:  # the client left: the generation was cancelled
            stats.finish(status=499)
            release()
            return Response(status_code=499)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _released(response.body_iterator, release, app)
        else:
            release()
        return response

    @app.post("/v1/chat/completions")
    @_answers_errors
    async def chat_completions(request: Request):
        return await complete("chat", request)

    @app.post("/v1/completions")
    @_answers_errors
    async def completions(request: Request):
        return await complete("completions", request)

    return app


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object, refusing bodies over ``limit`` bytes (413) and broken JSON (400)."""
    declared = request.headers.get("content-length")
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            parts.append(part)
        elif size > limit + _DRAIN_LIMIT or (declared and int(declared) > limit + _DRAIN_LIMIT):
            break
    if size > limit:
        raise APIError(
            413,
            f"the request body is {size if size <= limit + _DRAIN_LIMIT else 'over ' + str(size)} "
            f"bytes; this server takes at most {limit} (serve --max-body-bytes)",
            code="request_too_large",
        )
    try:
        body = json.loads(b"".join(parts))
    except RecursionError:
        raise APIError(
            400, f"the request body nests JSON more than {MAX_DEPTH} levels deep", code="invalid_json"
        ) from None
    except ValueError as err:  # broken JSON, invalid UTF-8, an integer too long to read
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    _check_tree(body)
    return body


def _check_tree(body: dict) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings that are not Unicode text (lone surrogates such as \\ud800)."""
    stack: list[tuple[dict | list, int, str]] = [(body, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(
                400, f"the request body nests JSON more than {MAX_DEPTH} levels deep (at {path})", code="invalid_json"
            )
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
            for text in (key, item):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise bad_param(
                            where.lstrip("."),
                            f"{where.lstrip('.')} holds an unpaired surrogate "
                            "(such as \\ud800): send valid Unicode text",
                        ) from None
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1, where))


def begin_shutdown(app: FastAPI) -> None:
    """Start the grace period of the requests in flight (see create_app); call from the event loop."""
    if not app.state.stopping:
        app.state.stopping = True
        asyncio.get_running_loop().call_later(app.state.shutdown_grace, app.state.grace_over.set)


def _shutdown_error(app: FastAPI) -> APIError:
    return APIError(
        503,
        f"the server is shutting down; the request did not finish within the "
        f"{app.state.shutdown_grace:g} s grace period: retry later",
        code="server_shutting_down",
    )


async def _until_left_or_stopped(handle, request: Request, app: FastAPI):
    """Await the engine's answer; None when the client disconnects first (the generation is cancelled),
    APIError(503) when the server's shutdown grace period ends first."""
    task = asyncio.ensure_future(handle)

    async def client_left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watchers = [asyncio.ensure_future(client_left()), asyncio.ensure_future(app.state.grace_over.wait())]
    try:
        await asyncio.wait([task, *watchers], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watcher in watchers:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
    if not task.cancelled():
        return task.result()
    if watchers[0].done() and not watchers[0].cancelled():
        return None
    raise _shutdown_error(app)


async def _released(iterator, release, app: FastAPI):
    """Pass a stream through; free its queue slot when it ends, fails or the client leaves. When the
    server's shutdown grace period ends first, the stream ends with an error event."""
    step, stop = None, asyncio.ensure_future(app.state.grace_over.wait())
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            await asyncio.wait([step, stop], return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                yield sse(_shutdown_error(app).body())
                yield sse("[DONE]")
                return
            try:
                part = step.result()
            except StopAsyncIteration:
                return
            yield part
    finally:
        with anyio.CancelScope(shield=True):
            for task in (step, stop):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            release()
            await iterator.aclose()


def _answers_errors(route):
    """An unexpected error in a route becomes an OpenAI-shaped 500 answered here, so that the
    connection stays usable (an exception left to Starlette's last handler closes it)."""

    @functools.wraps(route)
    async def guarded(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except (APIError, HTTPException):
            raise
        except Exception as err:
            logger.exception("%s failed", route.__name__)
            raise APIError(
                500, f"internal error ({type(err).__name__}); the server log has the details", code="internal_error"
            ) from None

    return guarded
