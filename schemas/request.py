"""Client -> gateway: the request that HTTP and NATS clients alike submit.

NATS clients publish `Request` (msgpack) to `subjects.REQUEST` with a reply
subject and read `reply.TokenChunk` / `reply.ErrorReply` messages from it.
"""

from __future__ import annotations

import msgspec
from epd.schemas.common import ImagePart, Message, SamplingParams, Struct


class Request(Struct, tag="epd.request.v1"):
    model: str
    messages: list[Message]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    request_id: str = ""  # the gateway assigns one when empty
    reply_to: str = ""  # set by the gateway from the NATS reply subject or its own inbox
    stream: bool = True
    prompt: str | None = None  # a raw prompt (completions API): tokenized as is, no chat template, no messages
    # A continuation: tokens this request already generated (and its client already has), prefilled after the
    # prompt so that generation goes on from them; `sampling.max_tokens` counts what is left. The gateway sends
    # one when the decoder serving the request died, under a new request id, to the same reply subject.
    resume_tokens: list[int] = []

    def images(self) -> list[ImagePart]:
        return [p for m in self.messages for p in m.content if isinstance(p, ImagePart)]
