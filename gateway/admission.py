"""Admission at the door, as ASGI middleware: a generation request over the in-flight limit gets a 429 with
Retry-After before its body is read, parsed or its images decoded.

Why here and not (only) in `Gateway.admit`: the gateway's own check runs after FastAPI has read the body,
validated it with pydantic and decoded (or fetched) its images. Under overload every refused request paid
that, on the one event loop that also relays the accepted requests' tokens, and requests still being read
were not counted at all, so the memory of bodies in progress had no bound but the clients' number of
connections. Here a request holds its slot from its first byte to its last byte out (a stream's `[DONE]`),
so at most `limit` bodies (each at most `EPD_MAX_BODY_MB`) and `limit` reply streams exist at once, and a
refusal costs the HTTP parse and one small JSON write.
"""

from __future__ import annotations

import json

from epd.core import metrics
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError
from .limits import DRAIN_BYTES

GENERATE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
RETRY_AFTER_S = 1  # a slot frees as soon as any request in flight ends: seconds, not minutes


class Door:
    """At most `limit` generation requests in progress; the rest are refused at once, never queued."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit
        self.inside = 0
        self.refused = 0
        body = ApiError(
            429, f"{limit} requests in flight, this gateway's limit; retry shortly", "rate_limit_error"
        ).body()
        self._refusal = json.dumps(body).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.inside >= self.limit:
            await self._refuse(receive, send)
            return
        self.inside += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inside -= 1

    async def _refuse(self, receive: Receive, send: Send) -> None:
        self.refused += 1
        metrics.REQUESTS.labels("", "429").inc()
        metrics.ERRORS.labels("gateway", "429").inc()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self._refusal)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": self._refusal})
        # Read what the client still sends and drop it (bounded): the connection stays usable for its next
        # request, and a client still writing its body is not left blocked on a server that stopped reading.
        seen, more = 0, True
        while more and seen < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
