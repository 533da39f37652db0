"""Embeddings landing in the encoder cache, announced per key: prefill waits on the event, never polls.

An encoder publishes `epd.v1.ec.landed.<key>` (core NATS, empty body) after it saved a key's embedding. A
process that may wait for embeddings (prefill, pd, epd) subscribes once to them all; `Landed.wait` wakes on the
first of its keys to land, or at its deadline. An event can be missed (a reconnect) or come before the waiter
listened: so a waiter registers before it looks in the cache, and looks once more at its deadline.
"""

from __future__ import annotations

import asyncio

import nats
from epd.core import subjects


class Landed:
    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._sub: nats.aio.subscription.Subscription | None = None

    async def start(self) -> Landed:
        self._sub = await self.nc.subscribe(subjects.ec_landed("*"), cb=self._on)
        # The server has the subscription before anyone counts on it, after two round trips: nats-py writes a
        # flush's PING at once, while the SUB may still wait in its buffer for the flusher task, so the first PONG
        # can come back before the server saw the SUB (1 run in about 30 lost the first announcement). The
        # flusher runs while the first round trip is out: the second PING follows the SUB.
        await self.nc.flush()
        await self.nc.flush()
        return self

    async def announce(self, keys: list[str]) -> None:
        """This process saved these keys' embeddings."""
        for key in dict.fromkeys(keys):
            await self.nc.publish(subjects.ec_landed(key), b"")

    async def _on(self, msg: nats.aio.msg.Msg) -> None:
        self.heard(msg.subject.rsplit(".", 1)[-1])

    def heard(self, key: str) -> None:
        """`key`'s embedding landed: wake whoever waits for it."""
        for event in self._waiting.get(key, ()):
            event.set()

    def watch(self, keys: list[str]) -> asyncio.Event:
        """An event set when any of `keys` lands; `forget` it when done."""
        event = asyncio.Event()
        for key in keys:
            self._waiting.setdefault(key, set()).add(event)
        return event

    def forget(self, keys: list[str], event: asyncio.Event) -> None:
        for key in keys:
            waiters = self._waiting.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiting[key]
