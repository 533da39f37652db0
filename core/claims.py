"""Which images some request is being encoded for right now, across every gateway.

A claim is a create in a NATS key-value bucket (atomic: one creator wins) that expires after
`ENCODING_CLAIM_TTL_S`, so a claim whose encode died frees itself. The router claims; the encoder
releases once the embeddings are saved (the cache answers for them then) or their encode failed.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from epd.core import subjects
from epd.core.tracing import tracer
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


class EncodeClaims:
    def __init__(self, js: nats.js.JetStreamContext) -> None:
        self.js = js
        self._kv: KeyValue | None = None

    async def claim(self, key: str) -> bool:
        """True: the caller encodes `key`; False: another request already is."""
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(subjects.ENCODING_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await self.js.create_key_value(
                    KeyValueConfig(bucket=subjects.ENCODING_BUCKET, ttl=subjects.ENCODING_CLAIM_TTL_S, history=1)
                )
        with tracer().start_as_current_span("claims.claim"):  # a JetStream round trip, on the request's path
            try:
                await self._kv.create(key, b"")
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                return False

    async def release(self, keys: list[str]) -> None:
        """The encodes of `keys` are done (saved or failed): the next request encodes or loads them itself."""
        try:
            if self._kv is None:
                self._kv = await self.js.key_value(subjects.ENCODING_BUCKET)
            with tracer().start_as_current_span("claims.release", attributes={"epd.images": len(keys)}):
                for key in dict.fromkeys(keys):
                    await self._kv.delete(key)
        except (nats.errors.Error, asyncio.TimeoutError) as e:  # no bucket (no router claimed), or NATS away: TTL
            log.debug("encode claims not released (their TTL will): %s", e)
