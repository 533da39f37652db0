"""OpenAI chat-completions shapes: the request body in, `schemas.Request` out, responses back."""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Literal

from epd.schemas.common import FinishReason, ImagePart, Message, SamplingParams, TextPart, Usage
from epd.schemas.request import Request
from pydantic import BaseModel, ConfigDict, Field

from .errors import ApiError


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class TextContent(BaseModel):
    type: Literal["text"]
    text: str


class ImageContent(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextContent | ImageContent]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    n: int = 1


FINISH = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",
    FinishReason.ERROR: "error",
}


def decode_image_url(url: str, index: int) -> bytes:
    """Base64 `data:` URLs only; fetching remote URLs is off."""
    if not url.startswith("data:"):
        raise ApiError(
            400, f"image {index}: only base64 data: URLs are accepted; remote image URLs are disabled", param="messages"
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"image {index}: data URL must be of the form data:<mime>;base64,<data>", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image {index}: data URL payload is not valid base64", param="messages") from None


def to_request(body: ChatCompletionRequest, request_id: str, default_max_tokens: int) -> Request:
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
                parts.append(ImagePart(data=decode_image_url(p.image_url.url, n_images)))
                n_images += 1
        messages.append(Message(role=m.role, content=parts))
    sampling = SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    return Request(model=body.model, messages=messages, sampling=sampling, request_id=request_id, stream=body.stream)


def completion(request_id: str, model: str, text: str, reason: FinishReason | None, usage: Usage | None) -> dict:
    u = usage or Usage(prompt_tokens=0, completion_tokens=0)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": FINISH.get(reason) if reason else None,
            }
        ],
        "usage": {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        },
    }


def sse_chunk(request_id: str, model: str, created: int, delta: dict, reason: str | None) -> str:
    body = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
    }
    return f"data: {json.dumps(body)}\n\n"
