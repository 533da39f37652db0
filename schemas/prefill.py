"""Gateway -> prefill: a request whose images (if any) need no encoder."""

from __future__ import annotations

from epd.schemas.common import ImageEmbedding, Struct
from epd.schemas.encode import EmbeddingReady
from epd.schemas.request import Request


class PrefillJob(Struct, tag="epd.prefill_job.v1"):
    """`images[i]` is image i of the request: key only for a cache hit, empty list for text.

    A worker that encodes inline (`epd` role) computes what the cache lacks.
    """

    request: Request
    images: list[ImageEmbedding] = []
    pending: list[int] = []  # images another request is encoding right now: wait for them in the cache
    encode_inline: bool = False  # no encoder is alive: the prefill worker encodes what the cache lacks


PrefillInput = PrefillJob | EmbeddingReady
