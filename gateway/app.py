"""HTTP app: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `/health`, `/ready`,
`/metrics`, and the OpenAPI document at `/openapi.json`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from epd.core import metrics
from epd.core.config import Settings
from epd.core.loop_lag import watch_loop_lag
from epd.core.tracing import tracer
from epd.schemas.common import Usage
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .admission import Door
from .errors import ApiError
from .limits import BodySizeLimit
from .openai_api import (
    CHAT,
    FINISH,
    TEXT,
    ChatCompletionRequest,
    CompletionRequest,
    Shape,
    to_request,
    to_text_request,
)
from .replies import ReplyStream
from .service import Gateway, new_request_id

DEFAULT_MAX_TOKENS = 256

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = await Gateway.start(settings)
        stopping = asyncio.Event()
        lag = asyncio.create_task(watch_loop_lag("gateway", stopping))
        yield
        stopping.set()
        await lag
        await app.state.gateway.close()

    # Our request span is the HTTP server span (HTTP and GenAI attributes both): FastAPI's own telemetry
    # would add a second span per request for nothing.
    app = FastAPI(title="epd", version="0.1.0", lifespan=lifespan, telemetry={"tracing": False, "metrics": False})

    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_body_mb * (1 << 20)))
    app.add_middleware(Door, limit=settings.max_inflight)  # outside the body limit: over the limit, read nothing

    if keys := settings.api_key_set:

        @app.middleware("http")
        async def require_api_key(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's middleware
            if request.url.path.startswith("/v1/"):
                auth = request.headers.get("authorization", "")
                token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
                    err = ApiError(
                        401,
                        "missing or invalid API key: send it as 'Authorization: Bearer <key>'",
                        "authentication_error",
                        code="invalid_api_key",
                    )
                    metrics.REQUESTS.labels("", "401").inc()
                    return JSONResponse(err.body(), status_code=401)
            return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, e: Exception) -> JSONResponse:
        # the last resort: a bug still answers in OpenAI's shape, never as a bare text 500
        log.exception("unexpected error serving a request")
        metrics.REQUESTS.labels("", "500").inc()
        return JSONResponse(ApiError(500, f"{type(e).__name__}: {e}", "server_error").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        # of a union's failed branches, the one that got deepest says what was wrong
        errors = e.errors()
        first = max(errors, key=lambda err: len(err.get("loc", ()))) if errors else {}
        # without the branch labels pydantic puts in a location ("list[...]", "function-after[...]")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p))
        err = ApiError(400, f"invalid request: {where}: {first.get('msg', 'malformed body')}", param=where or None)
        metrics.REQUESTS.labels("", "400").inc()
        return JSONResponse(err.body(), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """NATS is connected and every role the topology needs has a live worker (readiness)."""
        state = await app.state.gateway.readiness()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "epd"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):  # noqa: ANN202 - JSON or a stream
        return await _serve(app.state.gateway, CHAT, body, to_request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):  # noqa: ANN202 - JSON or a stream
        return await _serve(app.state.gateway, TEXT, body, to_text_request)

    return app


async def _serve(gw: Gateway, shape: Shape, body: ChatCompletionRequest | CompletionRequest, to_req: Callable):  # noqa: ANN202
    """Submit the request; answer JSON, or an SSE stream. Its span is the HTTP server span."""
    request_id = new_request_id()
    span = tracer().start_span(
        f"POST {shape.route}",
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "POST",
            "http.route": shape.route,
            "url.path": shape.route,
            "url.scheme": "http",
            "server.port": gw.settings.port,
            "epd.request_id": request_id,
            "gen_ai.operation.name": shape.operation,
            "gen_ai.request.model": body.model,
            "gen_ai.request.temperature": body.temperature,
            "gen_ai.request.top_p": body.top_p,
            "gen_ai.response.id": request_id,
            "epd.stream": body.stream,
        },
    )
    try:
        # a client's mistake (4xx) is not a span error: _finish sets the status from the HTTP code
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            req = await to_req(body, request_id, DEFAULT_MAX_TOKENS, gw.image_urls)
            span.set_attribute("gen_ai.request.max_tokens", req.sampling.max_tokens)
            replies = await gw.submit(req)
    except ApiError as e:
        _finish(span, body.model, None, e.status)
        raise
    if body.stream:
        usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(gw, shape, replies, body.model, span, usage_chunk)
        return StreamingResponse(events, media_type="text/event-stream")
    text, last = [], None
    reply_span = _reply_span(span, replies)
    try:
        async for c in replies:
            text.append(c.text)
            last = c
    except ApiError as e:
        _finish(span, body.model, replies, e.status)
        raise
    finally:
        reply_span.end()
        await replies.close()
    reason, usage = (last.finish_reason, last.usage) if last else (None, None)
    _finish(span, body.model, replies, 200, usage, FINISH.get(reason) if reason else None)
    return shape.response(request_id, body.model, "".join(text), reason, usage)


async def _sse(
    gw: Gateway, shape: Shape, replies: ReplyStream, model: str, span: trace.Span, usage_chunk: bool
) -> AsyncIterator[str]:
    """OpenAI's stream: (chat) a role delta, content chunks, a finish chunk, a usage chunk if asked, `[DONE]`."""
    created = int(time.time())
    rid = replies.request_id
    status, usage, reason = 200, None, None
    reply_span = _reply_span(span, replies)
    try:
        if opening := shape.opening(rid, model, created):
            yield opening
        async for c in replies:
            if c.text:
                yield shape.chunk(rid, model, created, c.text, None)
            if c.finish_reason is not None:
                usage, reason = c.usage, FINISH[c.finish_reason]
                yield shape.chunk(rid, model, created, None, reason)
                if usage_chunk and usage is not None:
                    yield shape.usage_chunk(rid, model, created, usage)
    except ApiError as e:
        status = e.status
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        reply_span.end()
        if not replies.finished:  # the client went away: free what every stage holds for it
            await gw.cancel(replies.attempt)
            status = 499
        await replies.close()
        _finish(span, model, replies, status, usage, reason)
    yield "data: [DONE]\n\n"


def _reply_span(parent: trace.Span, replies: ReplyStream) -> trace.Span:
    """Reading the reply subject: from the request's hand-off to its last chunk. The caller ends it."""
    return tracer().start_span(
        "reply",
        context=trace.set_span_in_context(parent),
        attributes={"epd.request_id": replies.request_id, "messaging.destination.name": replies.inbox},
    )


def _finish(
    span: trace.Span,
    model: str,
    replies: ReplyStream | None,
    status: int,
    usage: Usage | None = None,
    reason: str | None = None,
) -> None:
    """End the request's span and count it: status, TTFT, time per output token, latency, tokens."""
    metrics.REQUESTS.labels(model, str(status)).inc()
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        metrics.ERRORS.labels("gateway", str(status)).inc()
    if replies is not None and replies.first_token_at is not None:
        ttft = replies.first_token_at - replies.opened_at
        metrics.TTFT.labels(model).observe(ttft)
        span.set_attribute("epd.ttft_ms", round(ttft * 1e3, 3))
        if replies.first_token_ns is not None:  # the TTFT window as a span, to lay the pipeline's spans against
            first = tracer().start_span(
                "ttft",
                context=trace.set_span_in_context(span),
                start_time=replies.opened_ns,
                attributes={"epd.request_id": replies.request_id},
            )
            first.end(end_time=replies.first_token_ns)
        if replies.tokens > 1 and replies.last_token_at is not None:
            tpot = (replies.last_token_at - replies.first_token_at) / (replies.tokens - 1)
            metrics.TPOT.labels(model).observe(tpot)
            span.set_attribute("epd.tpot_ms", round(tpot * 1e3, 3))
        if status == 200:
            metrics.E2E.labels(model).observe(time.perf_counter() - replies.opened_at)
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        metrics.PROMPT_TOKENS.labels(model).inc(usage.prompt_tokens)
        metrics.GENERATION_TOKENS.labels(model).inc(usage.completion_tokens)
    if reason is not None:
        span.set_attribute("gen_ai.response.finish_reasons", (reason,))
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
