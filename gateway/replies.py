"""Reading a request's replies from its NATS reply subject, in sequence order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import nats
from epd.schemas.codec import Decoder, WireError
from epd.schemas.reply import ErrorReply, Reply, TokenChunk

from .errors import ApiError

_decoder: Decoder[Reply] = Decoder(Reply)


class ReplyStream:
    """Subscribe before publishing the request; iterate chunks until the one with a finish reason."""

    def __init__(
        self, nc: nats.NATS, request_id: str, timeout_s: float, on_close: Callable[[], None] | None = None
    ) -> None:
        self.nc, self.request_id, self.timeout_s = nc, request_id, timeout_s
        self._on_close = on_close
        self.inbox = f"_INBOX.epd.{request_id}"
        self.finished = False
        # timings for TTFT, time per output token and end-to-end latency (perf_counter seconds)
        self.opened_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.tokens = 0
        self._sub: nats.aio.subscription.Subscription | None = None

    async def open(self) -> ReplyStream:
        self._sub = await self.nc.subscribe(self.inbox)
        return self

    async def close(self) -> None:
        """Idempotent; the first call also runs `on_close` (the gateway's in-flight count)."""
        if self._on_close is not None:
            self._on_close, on_close = None, self._on_close
            on_close()
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        assert self._sub is not None, "open() first"
        deadline = time.monotonic() + self.timeout_s
        pending: dict[int, TokenChunk] = {}
        expected = 0
        while not self.finished:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(504, f"request {self.request_id} timed out after {self.timeout_s:.0f}s", "timeout_error")
            try:
                msg = await self._sub.next_msg(timeout=left)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            try:
                reply = _decoder.decode(msg.data)
            except WireError:
                continue  # not ours to answer; the stream goes on
            if isinstance(reply, ErrorReply):
                self.finished = True
                raise ApiError(reply.status, reply.message, reply.type)
            pending[reply.seq] = reply
            while expected in pending:
                c = pending.pop(expected)
                expected += 1
                self.finished = c.finish_reason is not None
                if c.token_ids:
                    self.last_token_at = time.perf_counter()
                    self.first_token_at = self.first_token_at or self.last_token_at
                    self.tokens += len(c.token_ids)
                yield c
                if self.finished:
                    break
