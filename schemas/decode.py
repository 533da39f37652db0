"""Prefill -> decode: the KV cache of a prefilled prompt is ready to load."""

from __future__ import annotations

from epd.schemas.common import SamplingParams, Struct, TensorHandle


class KVReady(Struct, tag="epd.kv_ready.v1"):
    request_id: str
    reply_to: str
    model: str
    sampling: SamplingParams
    prompt_tokens: int
    first_token: int  # already sent to the client as chunk 0
    rope_delta: int  # M-RoPE: decode position = text position + rope_delta
    kv: TensorHandle  # (layers, 2, kv_heads, prompt_tokens, head_dim), one contiguous block
