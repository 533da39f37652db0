"""Reading a request's replies from its NATS reply subject, in sequence order."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import nats
from epd.schemas import subjects
from epd.schemas.codec import Decoder, WireError, encode
from epd.schemas.control import Cancel
from epd.schemas.reply import ErrorReply, Reply, TokenChunk

from .errors import ApiError

_decoder: Decoder[Reply] = Decoder(Reply)

# Replies ride core NATS: what a worker publishes while the gateway is cut off from the server is gone.
# A stream that lived through a reconnect goes on if its next chunk comes within this grace; otherwise it
# ends in a retryable 503 rather than waiting out its deadline. (Its jobs are in JetStream and survive.)
RECONNECT_GRACE_S = 3.0
DISCONNECTED_LIMIT_S = 5.0  # cut off this long: a retryable 503, the request is not left hanging
POLL_S = 0.5


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

    async def _abandon(self) -> None:
        """Tell every stage to drop this request: its client is told to retry it."""
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(subjects.CANCEL, encode(Cancel(request_id=self.request_id)))

    def _reconnects(self) -> int:
        return self.nc.stats.get("reconnects", 0)

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
        reconnects = self._reconnects()
        suspect_since: float | None = None  # since a reconnect (or a disconnection) with no chunk after it
        while not self.finished:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                raise ApiError(504, f"request {self.request_id} timed out after {self.timeout_s:.0f}s", "timeout_error")
            if self._reconnects() != reconnects or not self.nc.is_connected:
                reconnects, suspect_since = self._reconnects(), suspect_since or now
            if suspect_since is not None:
                limit = DISCONNECTED_LIMIT_S if not self.nc.is_connected else RECONNECT_GRACE_S
                if now - suspect_since > limit:
                    self.finished = True
                    await self._abandon()
                    raise ApiError(
                        503,
                        f"request {self.request_id}: the gateway lost its NATS connection while answering; retry",
                        "server_error",
                        code="nats_unavailable",
                        retry_after_s=2,
                    )
            try:
                msg = await self._sub.next_msg(timeout=min(left, POLL_S))
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                self.finished = True
                raise ApiError(503, "the gateway is shutting down; retry", "server_error", retry_after_s=2) from None
            try:
                reply = _decoder.decode(msg.data)
            except WireError:
                continue  # not ours to answer; the stream goes on
            if isinstance(reply, ErrorReply):
                self.finished = True
                raise ApiError(reply.status, reply.message, reply.type)
            pending[reply.seq] = reply
            if expected in pending:
                suspect_since = None  # the stream goes on after the reconnect: nothing lost before this chunk
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
