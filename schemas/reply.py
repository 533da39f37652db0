"""Any stage -> client, on the request's reply subject (core NATS)."""

from __future__ import annotations

from epd.schemas.common import FinishReason, Struct, Usage


class TokenChunk(Struct, tag="epd.token_chunk.v1"):
    """Tokens in order: `seq` counts chunks from 0; the last carries finish_reason and usage."""

    request_id: str
    seq: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class ErrorReply(Struct, tag="epd.error.v1"):
    """The request ended with an error; `status` follows HTTP (400 bad input, 404 unknown model...).

    Terminal whatever its place: a client stops reading at the first error.
    """

    request_id: str
    status: int
    message: str
    type: str = "server_error"
    seq: int = -1
    # the request can go on from the tokens its client already has, as a continuation (Request.resume_tokens):
    # its decoder died and took the KV with it. The gateway does so; a NATS client may, or retry it whole.
    resumable: bool = False


Reply = TokenChunk | ErrorReply
