"""Prefill's embeddings for a request's images: loaded from the encoder cache, waited for as encoders announce
them, encoded inline, or sent back to the encoders; which of these is `core.routing.RoutingPolicy`'s answer."""

from __future__ import annotations

import asyncio
from typing import Protocol

from epd.connectors.ec import ECConnector
from epd.core import metrics, subjects
from epd.core.ec_events import Landed
from epd.core.outbox import Outbox
from epd.core.routing import RoutingPolicy, Source
from epd.core.runtime import Load
from epd.core.tracing import tracer
from epd.schemas.common import ImageEmbedding
from epd.schemas.encode import EmbeddingReady, EncodeJob
from epd.schemas.prefill import PrefillJob
from epd.workers.engine.family import Encoded
from epd.workers.errors import RequestFailed


class InlineEncoder(Protocol):
    async def encode(self, job: EncodeJob) -> list[ImageEmbedding]:
        """Encode `job.missing`, save each to the cache; a ref for every image of the request."""


class EmbeddingLookup:
    def __init__(
        self,
        ec: ECConnector,
        policy: RoutingPolicy,
        landed: Landed,
        encoder: InlineEncoder,
        out: Outbox,
        load: Load,
    ) -> None:
        self.ec, self.policy, self.landed, self.encoder, self.out, self.load = ec, policy, landed, encoder, out, load

    async def get(self, job: PrefillJob | EmbeddingReady) -> list[Encoded] | None:
        """Every image's embedding, in order; None if the request went back to the encoders."""
        keys = [ref.key for ref in job.images]
        loaded = await self._load(keys)
        missing = [i for i, e in enumerate(loaded) if e is None]
        wait_s = self.policy.wait_for(job, missing)
        if wait_s is not None:
            missing = await self._wait_for(keys, loaded, missing, wait_s)
        if not missing:
            return loaded  # type: ignore[return-value]
        # `again`: what the cache holds for these keys (if anything) is not usable: overwrite it
        encode = EncodeJob(request=job.request, keys=keys, missing=missing, again=True)
        source = self.policy.after_wait(job)
        if source is Source.INLINE:
            refs = await self.encoder.encode(encode)
            return await self.get(PrefillJob(request=job.request, images=refs))
        if source is Source.FAIL:
            raise RequestFailed(503, f"embeddings of images {missing} vanished from the encoder cache", "server_error")
        req = job.request
        await self.out.publish(subjects.ENCODE, encode, req.request_id, req.reply_to, "encode-again")
        return None

    async def _load(self, keys: list[str]) -> list[Encoded | None]:
        with tracer().start_as_current_span("ec.load", attributes={"epd.images": len(keys)}) as span:
            hits = await self.ec.load_many(keys) if keys else []
            nbytes = sum(h[0].numel() * h[0].element_size() for h in hits if h is not None)
            span.set_attribute("epd.hits", sum(h is not None for h in hits))
            span.set_attribute("epd.bytes", nbytes)
        metrics.CONNECTOR_BYTES.labels("ec", "load").inc(nbytes)
        found = sum(h is not None for h in hits)
        metrics.EC_LOOKUPS.labels("prefill", "hit").inc(found)
        metrics.EC_LOOKUPS.labels("prefill", "miss").inc(len(hits) - found)
        self.load.ec_hits += found
        self.load.ec_misses += len(hits) - found
        return [None if hit is None else Encoded(*hit) for hit in hits]

    async def _wait_for(
        self, keys: list[str], loaded: list[Encoded | None], missing: list[int], limit: float
    ) -> list[int]:
        """Load `missing` as encoders announce them (`ec_events.Landed`), for up to `limit` seconds; returns what is
        still missing then. An event can be missed (a reconnect): the cache is looked at once more at the deadline."""
        watched = [keys[i] for i in missing]
        landed = self.landed.watch(watched)  # before looking: an embedding landing meanwhile still wakes us
        clock = asyncio.get_running_loop().time
        started = clock()
        deadline = started + limit
        with tracer().start_as_current_span("ec.wait", attributes={"epd.images": len(missing)}) as span:
            try:
                while missing:
                    landed.clear()  # before looking: what lands after this look sets it again
                    missing = await self._load_into(keys, loaded, missing)
                    if not missing or deadline <= clock():
                        break
                    try:
                        await asyncio.wait_for(landed.wait(), deadline - clock())
                    except asyncio.TimeoutError:
                        missing = await self._load_into(keys, loaded, missing)  # the last look
                        break
            finally:
                self.landed.forget(watched, landed)
            span.set_attribute("epd.waited_ms", round((clock() - started) * 1e3, 1))
            span.set_attribute("epd.hit", not missing)
        return missing

    async def _load_into(self, keys: list[str], loaded: list[Encoded | None], indexes: list[int]) -> list[int]:
        """Load `indexes` into `loaded`; those still missing."""
        hits = await self.ec.load_many([keys[i] for i in indexes])
        for i, hit in zip(indexes, hits, strict=True):
            loaded[i] = None if hit is None else Encoded(*hit)
        return [i for i in indexes if loaded[i] is None]
