"""Where each image of a request gets its embedding: one policy, asked by the gateway and by prefill.

At the gateway, per image (`RoutingPolicy.at_gateway`):

| in the cache | shared cache | encode claimed | an encoder alive | EPD_INLINE_ENCODE | -> image is       |
|--------------|--------------|----------------|------------------|-------------------|-------------------|
| yes          | -            | -              | -                | -                 | CACHED            |
| no           | no (epd)     | -              | -                | -                 | INLINE            |
| no           | yes          | by another     | -                | -                 | WAIT              |
| no           | yes          | by this one    | yes              | -                 | ENCODE            |
| no           | yes          | by this one    | no               | on                | INLINE            |
| no           | yes          | by this one    | no               | off               | ENCODE (1)        |

(1) admission has answered 503 already unless an encoder came back meanwhile.
A request with an image to ENCODE goes to the encoders; any other goes to prefill.

At prefill, for the images the cache does not hold when the job arrives:
1. `wait_for`: wait for their landing events if every one is being encoded (WAIT at the gateway, or the other
   parts of a request split over encoders), or if the job comes from an encoder (an embedding just saved can
   hide a moment behind a concurrent rewrite);
2. `after_wait`: what is still missing is encoded INLINE (the aggregated worker's own cache; or EPD_INLINE_ENCODE
   and no encoder was alive or a pending encode timed out), or sent back to the encoders (ENCODE), or, if the
   encoders have just encoded it anew and it is gone again, the request FAILs rather than loop.

The policy only decides; its callers gather the facts (cache lookups, claims, the pool view) and act.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from epd.schemas.encode import EmbeddingReady
from epd.schemas.prefill import PrefillJob

LANDING_GRACE_S = 0.2  # how long prefill waits for an embedding an encoder has just announced as saved


class Source(enum.Enum):
    """Where an image's embedding comes from."""

    CACHED = "cached"  # the encoder cache holds it: load it
    ENCODE = "encode"  # the encoders compute it
    WAIT = "wait"  # an encode of it is in flight (another request's, or another part of this one's): wait for it
    INLINE = "inline"  # the prefill worker computes it itself
    FAIL = "fail"  # encoded anew and gone again: the request fails (503) instead of looping


@dataclass(frozen=True)
class Route:
    """The gateway's answer for one request: a source per image."""

    sources: list[Source]

    def where(self, source: Source) -> list[int]:
        return [i for i, s in enumerate(self.sources) if s is source]

    @property
    def to_encoders(self) -> bool:
        """The request goes to the encoders first (else straight to prefill)."""
        return Source.ENCODE in self.sources

    @property
    def inline(self) -> bool:
        return Source.INLINE in self.sources


@dataclass(frozen=True)
class RoutingPolicy:
    shared_cache: bool  # False: the aggregated (epd) worker, whose cache is its own and which encodes what it lacks
    inline_fallback: bool  # EPD_INLINE_ENCODE: prefill encodes when no encoder is alive or a pending encode times out
    encode_wait_s: float = 30.0  # EPD_ENCODE_WAIT_S: how long prefill waits for an encode in flight

    async def at_gateway(
        self,
        keys: Sequence[str],
        present: Sequence[bool],
        claim: Callable[[str], Awaitable[bool]],
        encoders_alive: Callable[[], Awaitable[bool]],
    ) -> Route:
        """A source per image. `present[i]`: the cache holds image i; `claim(key)`: True if this request now owns
        that key's encode (asked only of images missing from a shared cache); `encoders_alive()` is asked only when
        this request would encode and may fall back to inline."""
        if not self.shared_cache:
            return Route([Source.INLINE] * len(keys))
        sources = [Source.CACHED if there else Source.ENCODE for there in present]
        for i, key in enumerate(keys):
            if sources[i] is Source.ENCODE and not await claim(key):
                sources[i] = Source.WAIT
        if Source.ENCODE in sources and self.inline_fallback and not await encoders_alive():
            sources = [Source.INLINE if s is Source.ENCODE else s for s in sources]
        return Route(sources)

    def wait_for(self, job: PrefillJob | EmbeddingReady, missing: Sequence[int]) -> float | None:
        """Prefill's first answer for the images the cache lacks: seconds to wait for them to land, or None."""
        if not missing:
            return None
        pending = set(job.pending)
        if isinstance(job, PrefillJob) and not set(missing) <= pending:
            return None
        return self.encode_wait_s if pending & set(missing) else LANDING_GRACE_S

    def after_wait(self, job: PrefillJob | EmbeddingReady) -> Source:
        """Prefill's answer for the images still missing once it has waited (or chose not to)."""
        if not self.shared_cache:
            return Source.INLINE
        no_encoder = isinstance(job, PrefillJob) and job.encode_inline
        if self.inline_fallback and (no_encoder or job.pending):
            return Source.INLINE
        if isinstance(job, EmbeddingReady) and job.again:
            return Source.FAIL
        return Source.ENCODE
