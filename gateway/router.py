"""One router for HTTP and NATS clients: which stage a request goes to first.

Image bytes enter the system here, once: each image is checked, stored in the image store under its content
key, and the request goes on with keys only (no message carries image bytes).

- text only                    -> prefill
- images, all in the EC cache  -> prefill, with their keys (no encoder involved)
- images, some missing         -> encode, naming only the missing ones that no other request is
                                  encoding now; those are `pending`, and prefill waits for them
- images missing, all pending  -> prefill, which waits for them in the cache
- no encoder alive             -> prefill, which encodes inline (EPD_INLINE_ENCODE=fallback, the default)
- `epd` topology               -> prefill; the aggregated worker encodes what its own cache lacks
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats
from epd.connectors.ec import ECConnector
from epd.connectors.image_store import ImageStore
from epd.connectors.keys import KeySpace
from epd.core import metrics, subjects
from epd.core.images import BadImage, ImageTooLarge, open_image
from epd.core.runtime import Runtime
from epd.core.tracing import tracer
from epd.schemas.common import ImageEmbedding, ImagePart
from epd.schemas.encode import EncodeJob
from epd.schemas.prefill import PrefillJob
from epd.schemas.request import Request
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from .errors import ApiError


async def _always_live(role: str) -> bool:
    return True


def _one(role: str) -> int:
    return 1


class EncodeClaims:
    """Which images some request is being encoded for right now, across every gateway.

    A claim is a create in a NATS key-value bucket (atomic: one creator wins) that expires after
    `ENCODING_CLAIM_TTL_S`, so a claim whose encode died frees itself.
    """

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
        try:
            await self._kv.create(key, b"")
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False


class Router:
    def __init__(self, rt: Runtime, keys: KeySpace, ec: ECConnector | None) -> None:
        self.rt, self.keys, self.ec = rt, keys, ec  # ec None: no shared cache to ask (epd topology)
        self.images = ImageStore(rt.js, rt.settings.image_ttl_s)
        self.claims = EncodeClaims(rt.js)
        self.live: Callable[[str], Awaitable[bool]] = _always_live  # the gateway plugs in its view of the pool
        self.pool_size: Callable[[str], int] = _one
        self.settings = rt.settings
        self.model_name = rt.settings.model_name

    def validate(self, req: Request) -> None:
        if req.model != self.model_name:
            raise ApiError(
                404,
                f"The model '{req.model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )
        if req.prompt is not None:
            if req.messages:
                raise ApiError(400, "send either messages (chat) or prompt (completions), not both", param="prompt")
            if not req.prompt:
                raise ApiError(400, "prompt must not be empty", param="prompt")
        elif not req.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        if req.sampling.max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {req.sampling.max_tokens}", param="max_tokens")
        if req.sampling.max_tokens > self.settings.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {req.sampling.max_tokens} is over this server's limit of {self.settings.max_tokens_limit}",
                param="max_tokens",
            )
        if req.sampling.temperature < 0:
            raise ApiError(400, f"temperature must be >= 0, got {req.sampling.temperature}", param="temperature")
        if not 0 < req.sampling.top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {req.sampling.top_p}", param="top_p")
        if req.sampling.top_k < 0:
            raise ApiError(400, f"top_k must be >= 0 (0 keeps every token), got {req.sampling.top_k}", param="top_k")
        images = req.images()
        if len(images) > self.settings.max_images:
            raise ApiError(413, f"{len(images)} images; this server takes at most {self.settings.max_images}")
        # an image already stored (a continuation the gateway sends again) comes as its key, of this model's space
        stored = f"{self.keys.prefix}-image-"
        if any(not im.data and not (im.key.startswith(stored) and im.nbytes > 0) for im in images):
            raise ApiError(400, "an image part has no bytes", param="messages")

    def _check_image(self, image: ImagePart, i: int) -> str:
        """Decodable and within the pixel limit (a 400 or 413 naming it otherwise); its content key."""
        try:
            open_image(image.data, i, self.settings.max_image_pixels)
        except ImageTooLarge as e:
            raise ApiError(413, str(e), param="messages") from None
        except BadImage as e:
            raise ApiError(400, str(e), param="messages") from None
        return self.keys.key(image.data)

    async def _store_images(self, images: list[ImagePart]) -> list[str]:
        """Check each image off the event loop, store its bytes once, and leave only its key in the request."""
        new = [(i, im) for i, im in enumerate(images) if im.data]  # (the others were stored by an earlier attempt)
        keys = [await asyncio.to_thread(self._check_image, im, i) for i, im in new]
        with tracer().start_as_current_span("images.put", attributes={"epd.bytes": sum(len(im.data) for _, im in new)}):
            await asyncio.gather(*(self.images.put(k, im.data) for k, (_, im) in zip(keys, new, strict=True)))
        for key, (_, image) in zip(keys, new, strict=True):
            image.key, image.nbytes, image.data = key, len(image.data), b""
        return [im.key for im in images]

    async def route(self, req: Request) -> str:
        """Validate, store the images, and publish; returns the subject the request went to."""
        self.validate(req)
        images = req.images()
        with tracer().start_as_current_span("route", attributes={"epd.images": len(images)}) as span:
            keys = await self._store_images(images)
            present = await self.ec.exists(keys) if (self.ec and keys) else [False] * len(keys)
            missing = [i for i, p in enumerate(present) if not p]
            span.set_attribute("epd.ec_hits", len(keys) - len(missing))
            if self.ec is not None:
                metrics.EC_LOOKUPS.labels("router", "hit").inc(len(keys) - len(missing))
                metrics.EC_LOOKUPS.labels("router", "miss").inc(len(missing))
            # In-flight de-duplication: of the missing images, encode those no other request is encoding now.
            shared = self.ec is not None  # the aggregated worker's cache is its own: nothing to share
            pending = [i for i in missing if not await self.claims.claim(keys[i])] if missing and shared else []
            claimed = [i for i in missing if i not in pending]
            span.set_attribute("epd.ec_pending", len(pending))
            # no encoder alive: prefill encodes what the cache lacks itself, if allowed (else admission said 503)
            inline = bool(claimed) and self.settings.inline_encode and not await self.live("encode")
            span.set_attribute("epd.encode_inline", inline)
            if not keys or self.ec is None or not claimed or inline:
                images = [ImageEmbedding(key=k) for k in keys]
                job = PrefillJob(request=req, images=images, pending=pending, encode_inline=inline)
                subject, stage = (subjects.PREFILL, "prefill") if keys else (subjects.PREFILL_TEXT, "prefill")
            else:
                # several images, several encoders: encode in parallel; the lead part hands over to
                # prefill, which waits for the other parts in the cache as it waits for `pending` ones
                lead, *parts = split_images(claimed, images, max(1, self.pool_size("encode")))
                for n, part in enumerate(parts, 1):
                    side = EncodeJob(request=req, keys=keys, missing=part, handoff=False)
                    await self.rt.publish(subjects.ENCODE, side, req.request_id, req.reply_to, f"encode-{n}")
                job = EncodeJob(request=req, keys=keys, missing=lead, pending=pending + [i for p in parts for i in p])
                subject, stage = subjects.ENCODE, "encode"
                span.set_attribute("epd.encode_parts", 1 + len(parts))
            span.set_attribute("epd.route", stage)
            await self.rt.publish(subject, job, req.request_id, req.reply_to, stage)
            return subject


def split_images(indexes: list[int], images: list[ImagePart], ways: int) -> list[list[int]]:
    """`indexes` in at most `ways` parts of about equal bytes (largest first, each to the lightest part)."""
    parts: list[list[int]] = [[] for _ in range(min(ways, len(indexes)))]
    weight = [0] * len(parts)
    for i in sorted(indexes, key=lambda i: -images[i].nbytes):
        k = weight.index(min(weight))
        parts[k].append(i)
        weight[k] += images[i].nbytes
    return [sorted(p) for p in parts]
