"""Gateway -> encoder (`EncodeJob`), encoder -> prefill (`EmbeddingReady`)."""

from __future__ import annotations

from epd.schemas.common import ImageEmbedding, Struct
from epd.schemas.request import Request


class EncodeJob(Struct, tag="epd.encode_job.v1"):
    request: Request
    keys: list[str]  # content key of every image of the request, in order
    missing: list[int]  # indexes into `keys` that the encoder must compute
    pending: list[int] = []  # indexes another request is encoding right now: prefill waits for them
    handoff: bool = True  # False: one of several parts of the request encoded in parallel; save, hand nothing over
    # True: encode `missing` even where the cache says the key exists (its entry was found damaged or gone
    # on load, and a Mooncake lease may refuse to remove it): the fresh entry overwrites it
    again: bool = False


class EmbeddingReady(Struct, tag="epd.embedding_ready.v1"):
    """Every image of the request is in the encoder cache (or, if `pending`, soon); `images[i]` is image i."""

    request: Request
    images: list[ImageEmbedding]
    pending: list[int] = []  # as in EncodeJob: may not be in the cache yet
    again: bool = False  # from an EncodeJob sent `again`: what is still unusable now will not be encoded a third time
