"""Reading a request's replies from its NATS reply subject, in sequence order, across continuations.

When an attempt cannot finish (its decoder died with the KV: a resumable error; or chunks may have been
lost while the gateway was cut off from NATS), the stream asks its `resumer` to send a continuation: the
same request under a new id, with the tokens the client already has as `resume_tokens`. Prefill reads them
after the prompt and generation goes on from there; greedy tokens are those the first attempt would have
given. Chunks of the new attempt count their sequence from 0 and are told apart by their request id, so a
late chunk of the old attempt is neither shown twice nor taken for the new one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
from epd.core import subjects
from epd.schemas.codec import Decoder, WireError, encode
from epd.schemas.common import Usage
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
MAX_RESUMES = 3  # continuations of one request; past them, the error goes to the client

# (attempt given up on, every token the client has, resume number) -> the new attempt's request id, or None
Resumer = Callable[[str, list[int], int], Awaitable[str | None]]
log = logging.getLogger(__name__)


class ReplyStream:
    """Subscribe before publishing the request; iterate chunks until the one with a finish reason."""

    def __init__(
        self,
        nc: nats.NATS,
        request_id: str,
        timeout_s: float,
        on_close: Callable[[], None] | None = None,
        resumer: Resumer | None = None,
    ) -> None:
        """`resumer`: sends a continuation of the request when an attempt cannot finish (module doc)."""
        self.nc, self.request_id, self.timeout_s = nc, request_id, timeout_s
        self._on_close, self._resumer = on_close, resumer
        self.token_ids: list[int] = []  # every token yielded, over every attempt
        self.attempt = request_id  # the request id the stages know it by now (a continuation has its own)
        self.resumes = 0
        self._resumed_tokens = 0  # tokens the current attempt was given (counted in its prompt)
        self.inbox = f"_INBOX.epd.{request_id}"
        self.finished = False
        # timings for TTFT, time per output token and end-to-end latency (perf_counter seconds)
        self.opened_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.opened_ns = time.time_ns()  # the same two instants on the spans' clock (the `ttft` span)
        self.first_token_ns: int | None = None
        self.tokens = 0
        self._sub: nats.aio.subscription.Subscription | None = None

    async def open(self) -> ReplyStream:
        self._sub = await self.nc.subscribe(self.inbox)
        return self

    async def _abandon(self, attempt: str) -> None:
        """Tell every stage to drop this attempt: its client is told to retry it."""
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(subjects.CANCEL, encode(Cancel(request_id=attempt)))

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
        """Chunks in order, across continuations: after a resume, the new attempt's chunks (its own ids and
        sequence from 0) follow the tokens already yielded, and its usage counts the request's whole answer."""
        assert self._sub is not None, "open() first"
        deadline = time.monotonic() + self.timeout_s
        pending: dict[int, TokenChunk] = {}
        expected = 0
        attempt = self.attempt = self.request_id
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
                    # chunks may have been lost while cut off: go on from the tokens we have, or give up (retryable)
                    resumed = await self._resume(attempt, "the reply stream broke over a NATS reconnect")
                    if resumed is None:
                        self.finished = True
                        await self._abandon(attempt)
                        raise ApiError(
                            503,
                            f"request {self.request_id}: the gateway lost its NATS connection while answering; retry",
                            "server_error",
                            code="nats_unavailable",
                            retry_after_s=2,
                        )
                    attempt, pending, expected, suspect_since = resumed, {}, 0, None
                    self.attempt = attempt
                    continue
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
            if reply.request_id not in (attempt, ""):
                continue  # a late chunk of an attempt given up on: its tokens are already counted, or redone
            if isinstance(reply, ErrorReply):
                if reply.resumable:
                    resumed = await self._resume(attempt, reply.message)
                    if resumed is not None:
                        attempt, pending, expected, suspect_since = resumed, {}, 0, None
                        self.attempt = attempt
                        continue
                self.finished = True
                retry = 2 if reply.status in (429, 503) else None  # (a worker's retryable error: worth a retry)
                raise ApiError(reply.status, reply.message, reply.type, retry_after_s=retry)
            pending[reply.seq] = reply
            if expected in pending:
                suspect_since = None  # the stream goes on after the reconnect: nothing lost before this chunk
            while expected in pending:
                c = pending.pop(expected)
                expected += 1
                self.finished = c.finish_reason is not None
                if c.token_ids:
                    self.last_token_at = time.perf_counter()
                    if self.first_token_at is None:
                        self.first_token_at, self.first_token_ns = self.last_token_at, time.time_ns()
                    self.tokens += len(c.token_ids)
                    self.token_ids += c.token_ids
                if c.usage is not None and self._resumed_tokens:  # the whole answer's, not the continuation's
                    n = self._resumed_tokens
                    c.usage = Usage(
                        prompt_tokens=c.usage.prompt_tokens - n, completion_tokens=c.usage.completion_tokens + n
                    )
                c.request_id = self.request_id
                yield c
                if self.finished:
                    break

    async def _resume(self, attempt: str, why: str) -> str | None:
        """Continue the request from the tokens yielded so far under a new attempt id; None when it cannot."""
        if self._resumer is None or self.resumes >= MAX_RESUMES or not self.nc.is_connected:
            return None
        self.resumes += 1
        try:
            new = await self._resumer(attempt, list(self.token_ids), self.resumes)
        except Exception as e:  # noqa: BLE001 - (NATS away, no worker, a bad request): the caller's error stands
            log.warning("request %s could not be resumed (%s): %s", self.request_id, why, e)
            return None
        if new is None:
            return None
        self._resumed_tokens = len(self.token_ids)
        log.warning("request %s resumed as %s after %d tokens: %s", self.request_id, new, len(self.token_ids), why)
        return new
