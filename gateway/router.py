"""One router for HTTP and NATS clients: which stage a request goes to first.

Image bytes enter the system here, once: each image is checked, stored in the image store under its content
key, and the request goes on with keys only (no message carries image bytes).

Where each image's embedding comes from (the encoder cache, the encoders, an encode in flight, or prefill
itself) is `core.routing.RoutingPolicy`'s answer, the same policy prefill asks. A request with an image to
encode goes to the encoders, split over as many as are alive; any other goes to prefill (text-only requests
to their own lane).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from epd.connectors.ec import ECConnector
from epd.connectors.image_store import ImageStore
from epd.connectors.keys import KeySpace
from epd.core import metrics, subjects
from epd.core.claims import EncodeClaims
from epd.core.images import BadImage, ImageTooLarge, check_image
from epd.core.routing import Route, RoutingPolicy, Source
from epd.core.runtime import Runtime
from epd.core.tracing import tracer
from epd.schemas.common import ImageEmbedding, ImagePart
from epd.schemas.encode import EncodeJob
from epd.schemas.prefill import PrefillJob
from epd.schemas.request import Request
from opentelemetry import trace

from .errors import ApiError


async def _always_live(role: str) -> bool:
    return True


def _one(role: str) -> int:
    return 1


class Router:
    def __init__(self, rt: Runtime, keys: KeySpace, ec: ECConnector | None) -> None:
        self.rt, self.keys, self.ec = rt, keys, ec  # ec None: no shared cache to ask (epd topology)
        self.images = ImageStore(rt.js, rt.settings.image_ttl_s)
        self.claims = EncodeClaims(rt.js)
        s = rt.settings
        self.policy = RoutingPolicy(
            shared_cache=ec is not None, inline_fallback=s.inline_encode, encode_wait_s=s.encode_wait_s
        )
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
        """An image, whole and within the pixel limit, from its header and structure (a 400 or 413 naming it
        otherwise; core/images.check_image); its content key."""
        try:
            check_image(image.data, i, self.settings.max_image_pixels)
        except ImageTooLarge as e:
            raise ApiError(413, str(e), param="messages") from None
        except BadImage as e:
            raise ApiError(400, str(e), param="messages") from None
        return self.keys.key(image.data)

    async def _store_images(self, images: list[ImagePart]) -> list[str]:
        """Check each image off the event loop, store its bytes once, and leave only its key in the request."""
        new = [(i, im) for i, im in enumerate(images) if im.data]  # (the others were stored by an earlier attempt)
        # checked side by side in threads; a bad image is named by its place, the first
        checked = await asyncio.gather(
            *(asyncio.to_thread(self._check_image, im, i) for i, im in new), return_exceptions=True
        )
        if bad := next((c for c in checked if isinstance(c, BaseException)), None):
            raise bad
        keys = list(checked)
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
            route = await self._route_images(keys)
            span.set_attribute("epd.ec_hits", len(route.where(Source.CACHED)))
            span.set_attribute("epd.ec_pending", len(route.where(Source.WAIT)))
            span.set_attribute("epd.encode_inline", route.inline)
            if route.to_encoders:
                subject, stage = subjects.ENCODE, "encode"
                job = await self._split_over_encoders(req, keys, route)
            else:
                subject, stage = (subjects.PREFILL, "prefill") if keys else (subjects.PREFILL_TEXT, "prefill")
                waits = route.where(Source.WAIT)
                refs = [ImageEmbedding(key=k) for k in keys]
                job = PrefillJob(request=req, images=refs, pending=waits, encode_inline=route.inline)
            span.set_attribute("epd.route", stage)
            await self.rt.publish(subject, job, req.request_id, req.reply_to, stage)
            return subject

    async def _route_images(self, keys: list[str]) -> Route:
        """The policy's source for each image, from the cache, the encode claims and the pool."""
        present = [False] * len(keys)
        if self.ec and keys:
            with tracer().start_as_current_span("ec.exists", attributes={"epd.images": len(keys)}):
                present = await self.ec.exists(keys)
        if self.ec is not None:
            hits = sum(present)
            metrics.EC_LOOKUPS.labels("router", "hit").inc(hits)
            metrics.EC_LOOKUPS.labels("router", "miss").inc(len(keys) - hits)
        return await self.policy.at_gateway(keys, present, self.claims.claim, lambda: self.live("encode"))

    async def _split_over_encoders(self, req: Request, keys: list[str], route: Route) -> EncodeJob:
        """Several images, several encoders: encode in parallel. The side parts are published here; the lead part
        (returned) hands over to prefill, which waits for the other parts in the cache as for `pending` ones."""
        images = req.images()
        lead, *parts = split_images(route.where(Source.ENCODE), images, max(1, self.pool_size("encode")))
        for n, part in enumerate(parts, 1):
            side = EncodeJob(request=req, keys=keys, missing=part, handoff=False)
            await self.rt.publish(subjects.ENCODE, side, req.request_id, req.reply_to, f"encode-{n}")
        trace.get_current_span().set_attribute("epd.encode_parts", 1 + len(parts))
        pending = route.where(Source.WAIT) + [i for p in parts for i in p]
        return EncodeJob(request=req, keys=keys, missing=lead, pending=pending)


def split_images(indexes: list[int], images: list[ImagePart], ways: int) -> list[list[int]]:
    """`indexes` in at most `ways` parts of about equal bytes (largest first, each to the lightest part)."""
    parts: list[list[int]] = [[] for _ in range(min(ways, len(indexes)))]
    weight = [0] * len(parts)
    for i in sorted(indexes, key=lambda i: -images[i].nbytes):
        k = weight.index(min(weight))
        parts[k].append(i)
        weight[k] += images[i].nbytes
    return [sorted(p) for p in parts]
