"""OpenAI chat-completions shapes: the request body in, `schemas.Request` out, responses back."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from epd.schemas.common import FinishReason, ImagePart, Message, SamplingParams, TextPart, Usage
from epd.schemas.request import Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .errors import ApiError
from .image_urls import ImageUrls


def _encodable(text: str) -> str:
    """JSON may escape a lone UTF-16 surrogate (`"\\ud800"`); it is no character and cannot travel as UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class ImageUrl(BaseModel):
    url: Text
    detail: Text | None = None


class TextContent(BaseModel):
    type: Literal["text"]
    text: Text


class ImageContent(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text | list[Annotated[TextContent | ImageContent, Field(discriminator="type")]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationOptions(BaseModel):
    """What both completion APIs share: the model, sampling, stopping and streaming."""

    model_config = ConfigDict(extra="allow")

    model: Text
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, lt=2**31)  # an extension (as in vLLM): 0 or -1 keeps every token
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False  # an extension (as in vLLM): run to max_tokens
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(default=None, max_length=64)  # vLLM's

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(0, self.top_k),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop=stop_strings(self.stop),
            stop_token_ids=self.stop_token_ids or [],
        )


class ChatCompletionRequest(GenerationOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


FINISH = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",
    FinishReason.ERROR: "error",
}


MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"{len(stops)} stop sequences; at most {MAX_STOPS}", param="stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters", param="stop")
    return stops


async def to_request(body: ChatCompletionRequest, request_id: str, default_max_tokens: int, urls: ImageUrls) -> Request:
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported; only n=1", param="n")
    messages = []
    n_images = 0
    for m in body.messages:
        if isinstance(m.content, str):
            messages.append(Message(role=m.role, content=[TextPart(text=m.content)]))
            continue
        parts: list[TextPart | ImagePart] = []
        for p in m.content:
            if isinstance(p, TextContent):
                parts.append(TextPart(text=p.text))
            else:
                parts.append(ImagePart(data=await urls.fetch(p.image_url.url, n_images)))
                n_images += 1
        messages.append(Message(role=m.role, content=parts))
    sampling = body.sampling(body.max_completion_tokens or body.max_tokens or default_max_tokens)
    return Request(model=body.model, messages=messages, sampling=sampling, request_id=request_id, stream=body.stream)


def usage_dict(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


@dataclass(frozen=True)
class Shape:
    """What one OpenAI API's responses look like: chat completions, or (text) completions."""

    route: str
    operation: str  # gen_ai.operation.name
    object: str
    chunk_object: str
    chat: bool

    def _choice(self, text: str | None, reason: str | None, final: bool, opening: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if final:
            return {"index": 0, "message": {"role": "assistant", "content": text or ""}, "finish_reason": reason}
        delta = {"role": "assistant", "content": ""} if opening else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "finish_reason": reason}

    def response(
        self, request_id: str, model: str, text: str, reason: FinishReason | None, usage: Usage | None
    ) -> dict:
        return {
            "id": request_id,
            "object": self.object,
            "created": int(time.time()),
            "model": model,
            "choices": [self._choice(text, FINISH.get(reason) if reason else None, final=True)],
            "usage": usage_dict(usage or Usage(prompt_tokens=0, completion_tokens=0)),
        }

    def _event(self, request_id: str, model: str, created: int, choices: list[dict], **extra: object) -> str:
        body = {"id": request_id, "object": self.chunk_object, "created": created, "model": model, "choices": choices}
        return f"data: {json.dumps({**body, **extra})}\n\n"

    def opening(self, request_id: str, model: str, created: int) -> str | None:
        """Chat streams open with the assistant's role; text streams have no such chunk."""
        if not self.chat:
            return None
        return self._event(request_id, model, created, [self._choice(None, None, False, opening=True)])

    def chunk(self, request_id: str, model: str, created: int, text: str | None, reason: str | None) -> str:
        return self._event(request_id, model, created, [self._choice(text, reason, final=False)])

    def usage_chunk(self, request_id: str, model: str, created: int, usage: Usage) -> str:
        """The extra last chunk of `stream_options.include_usage`: no choices, the request's usage."""
        return self._event(request_id, model, created, [], usage=usage_dict(usage))


CHAT = Shape("/v1/chat/completions", "chat", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Shape("/v1/completions", "text_completion", "text_completion", "text_completion", chat=False)


class CompletionRequest(GenerationOptions):
    """`POST /v1/completions`: a raw prompt, no chat template."""

    prompt: Text | list[Text]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this API
    echo: bool = False
    suffix: Text | None = None
    logprobs: int | None = None


async def to_text_request(
    body: CompletionRequest, request_id: str, default_max_tokens: int, urls: ImageUrls
) -> Request:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, f"{len(prompts)} prompts; send exactly one per request", param="prompt")
    for name, unsupported in (
        ("n", body.n != 1),
        ("echo", body.echo),
        ("suffix", body.suffix is not None),
        ("logprobs", body.logprobs is not None),
    ):
        if unsupported:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    sampling = body.sampling(body.max_tokens or default_max_tokens)
    return Request(
        model=body.model, messages=[], prompt=prompts[0], sampling=sampling, request_id=request_id, stream=body.stream
    )
