"""HTTP app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from epd.ops.config import Settings
from epd.ops.tracing import tracer
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .errors import ApiError
from .openai_api import FINISH, ChatCompletionRequest, completion, sse_chunk, to_request
from .replies import ReplyStream
from .service import Gateway, new_request_id

DEFAULT_MAX_TOKENS = 256


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = await Gateway.start(settings)
        yield
        await app.state.gateway.close()

    app = FastAPI(title="epd", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        err = ApiError(400, f"invalid request: {where}: {first.get('msg', 'malformed body')}", param=where or None)
        return JSONResponse(err.body(), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "epd"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):  # noqa: ANN202 - JSON or a stream
        gw: Gateway = app.state.gateway
        request_id = new_request_id()
        span = tracer().start_span(
            f"chat {body.model}",
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "POST",
                "http.route": "/v1/chat/completions",
                "epd.request_id": request_id,
                "gen_ai.request.model": body.model,
            },
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                req = to_request(body, request_id, DEFAULT_MAX_TOKENS)
                replies = await gw.submit(req)
        except ApiError as e:
            _end(span, e.status)
            raise
        if body.stream:
            return StreamingResponse(_sse(gw, replies, body.model, span), media_type="text/event-stream")
        try:
            text, last = [], None
            async for c in replies:
                text.append(c.text)
                last = c
        except ApiError as e:
            _end(span, e.status)
            raise
        finally:
            await replies.close()
        _end(span, 200, last.usage if last else None)
        return completion(
            request_id, body.model, "".join(text), last.finish_reason if last else None, last.usage if last else None
        )

    return app


async def _sse(gw: Gateway, replies: ReplyStream, model: str, span: trace.Span) -> AsyncIterator[str]:
    created = int(time.time())
    rid = replies.request_id
    status, usage = 200, None
    try:
        yield sse_chunk(rid, model, created, {"role": "assistant", "content": ""}, None)
        async for c in replies:
            if c.text:
                yield sse_chunk(rid, model, created, {"content": c.text}, None)
            if c.finish_reason is not None:
                usage = c.usage
                yield sse_chunk(rid, model, created, {}, FINISH[c.finish_reason])
    except ApiError as e:
        status = e.status
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        if not replies.finished:  # the client went away: free what every stage holds for it
            await gw.cancel(rid)
            status = 499
        await replies.close()
        _end(span, status, usage)
    yield "data: [DONE]\n\n"


def _end(span: trace.Span, status: int, usage: object = None) -> None:
    span.set_attribute("http.response.status_code", status)
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
