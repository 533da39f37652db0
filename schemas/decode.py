"""Prefill -> decode: the KV cache of a prefilled prompt is ready to load."""

from __future__ import annotations

from enum import IntEnum

from epd.schemas.common import SamplingParams, Struct, TensorHandle


class KVPath(IntEnum):
    """How a request's KV travels from prefill to decode."""

    STORE = 1  # through Mooncake Store: any decoder can load it
    DIRECT = 2  # written into one decoder's granted room on its TransferEngine


class KVHandle(Struct):
    """A request's KV, wherever it is: `tensor.key` is the store key (STORE) or the decoder's grant id (DIRECT)."""

    path: KVPath
    tensor: TensorHandle  # (layers, 2, kv_heads, prompt_tokens, head_dim), one contiguous block

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes


class KVReady(Struct, tag="epd.kv_ready.v1"):
    request_id: str
    reply_to: str
    model: str
    sampling: SamplingParams
    prompt_tokens: int
    first_token: int  # already sent to the client as chunk 0
    rope_delta: int  # M-RoPE: decode position = text position + rope_delta
    kv: KVHandle
    resume_tokens: list[int] = []  # a continuation's earlier tokens (counted in prompt_tokens): text goes on after them


class KVReserve(Struct, tag="epd.kv_reserve.v1"):
    """Prefill -> one decoder (NATS request-reply): room for a request's KV, before prefill computes it."""

    request_id: str
    nbytes: int


class KVGrant(Struct, tag="epd.kv_grant.v1"):
    """The decoder's answer: where to write (`granted`), or why not."""

    granted: bool
    grant_id: str = ""
    session: str = ""  # the decoder's TransferEngine segment (host:port)
    address: int = 0  # where the KV's first byte goes in that segment
    ttl_s: float = 0.0  # the room is freed this long after the grant unless the KV is loaded first
    reason: str = ""


class KVRelease(Struct, tag="epd.kv_release.v1"):
    """Prefill -> the decoder (fire and forget): the granted room will not be written."""

    grant_id: str
