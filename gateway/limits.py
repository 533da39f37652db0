"""Request body size limit, as ASGI middleware: 413 before the body is read into memory."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError

DRAIN_BYTES = 256 << 20  # past the limit, read at most this much more of a refused body


class BodySizeLimit:
    """Refuse a body over `max_bytes`: by its Content-Length at once, or while it streams in (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        refused = False
        more = True

        async def limited_receive() -> Message:
            nonlocal seen, refused, more
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
                if seen > self.max_bytes:  # answer now; the app sees the client gone and stops reading
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # once refused, whatever the app still says goes nowhere
                await send(message)

        await self.app(scope, limited_receive, guarded_send)
        # Read the rest of a refused body (up to a bound) and drop it: a client still sending would
        # otherwise block on a connection the server stopped reading, and never see the 413.
        while refused and more and seen < self.max_bytes + DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _refuse(self, send: Send) -> None:
        mb = self.max_bytes / (1 << 20)
        body = json.dumps(ApiError(413, f"request body is over the limit of {mb:g} MB").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
