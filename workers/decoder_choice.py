"""P→D dispatch: which decoder gets a prefilled request, and what happens to a dead decoder's requests.

Prefill picks the live decoder with the most free KV tokens (its heartbeat's capacity less what it
holds), then the fewest active sequences, then the one it chose least recently (round robin among
equals), and publishes to that decoder's own subject. Heartbeats
are a second old at most, so the picker also counts what it sent each decoder since that
decoder's last beat: a burst spreads instead of piling onto the decoder that looked emptiest.

A decoder that dies leaves requests in its own queue. Every decoder looks for such orphans and
moves them to the shared decode queue, where any decoder takes them: nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

import nats
from epd.core import subjects
from epd.core.heartbeat import live_workers
from epd.core.runtime import Runtime
from epd.schemas.status import WorkerStatus
from epd.workers.loop import consumer_config

log = logging.getLogger(__name__)

DIRECT_INACTIVE_S = 60.0  # a decoder's own consumer is deleted this long after its last pull


def decoder_durable(worker_id: str) -> str:
    return f"decode-{worker_id}"


class DecoderPicker:
    def __init__(self, read: Callable[[], Awaitable[list[WorkerStatus]]], refresh_s: float = 1.0) -> None:
        """`read`: the live workers' heartbeats (`core.heartbeat.live_workers` over NATS; a fake in a unit test)."""
        self.read, self.refresh_s = read, refresh_s
        self.decoders: list[WorkerStatus] = []
        self._read_at = float("-inf")
        self._sent: dict[str, list[tuple[float, int]]] = defaultdict(list)  # worker -> (when, tokens)
        self._chosen: dict[str, int] = {}  # worker -> when this picker last chose it (a tick)
        self._tick = 0

    async def choose(self, tokens: int) -> str | None:
        """The decoder for a request that will hold `tokens` of KV; None when no decoder heartbeats."""
        if time.monotonic() - self._read_at > self.refresh_s:
            try:
                self.update(await self.read())
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                log.warning("cannot read the decoders' heartbeats, keeping the last view: %s", e)
            self._read_at = time.monotonic()
        return self.pick(tokens)

    def update(self, workers: list[WorkerStatus]) -> None:
        self.decoders = [w for w in workers if w.role == "decode"]
        for w in self.decoders:  # what a beat already counts is no longer ours to add
            self._sent[w.worker_id] = [(t, n) for t, n in self._sent[w.worker_id] if t > w.updated_at]

    def free_tokens(self, w: WorkerStatus) -> int:
        sent = sum(n for t, n in self._sent[w.worker_id] if t > w.updated_at)
        return w.kv_capacity - w.kv_tokens - sent

    def pick(self, tokens: int) -> str | None:
        if not self.decoders:
            return None
        best = max(self.decoders, key=lambda w: (self.free_tokens(w), -w.active, -self._chosen.get(w.worker_id, -1)))
        self._sent[best.worker_id].append((time.time(), tokens))
        self._tick += 1
        self._chosen[best.worker_id] = self._tick
        return best.worker_id


async def rescue_orphans(rt: Runtime) -> int:
    """Move the queued requests of decoders that no longer heartbeat to the shared queue; returns how many."""
    js = rt.js
    live = {w.worker_id for w in await live_workers(js) if w.role == "decode"}
    stream = subjects.stream_of(subjects.DECODE)
    info = await js.stream_info(stream, subjects_filter=subjects.decode_for("*"))
    moved = 0
    for subject in info.state.subjects or {}:
        worker_id = subject.rsplit(".", 1)[-1]
        if worker_id in live:
            continue
        sub = await js.pull_subscribe(
            subject, durable=decoder_durable(worker_id), config=consumer_config(rt.settings, DIRECT_INACTIVE_S)
        )
        try:
            msgs = await sub.fetch(64, timeout=0.5)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):  # what it had taken comes back after ack_wait
            msgs = []
        for msg in msgs:
            headers = dict(msg.headers or {})
            request_id = headers.get(subjects.REQUEST_ID_HEADER, "")
            headers["Nats-Msg-Id"] = f"{request_id}:rescued:{msg.metadata.sequence.stream}"  # not a duplicate
            await js.publish(subjects.DECODE, msg.data, headers=headers)
            await msg.ack()
            moved += 1
            log.warning("decoder %s is gone: request %s moved to the shared decode queue", worker_id, request_id)
        await sub.unsubscribe()
    return moved


async def rescue_loop(rt: Runtime, stop: asyncio.Event, every_s: float = 2.0) -> None:
    """`rescue_orphans` every `every_s` until `stop`."""
    while not stop.is_set():
        try:
            await rescue_orphans(rt)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            log.warning("orphan rescue failed (retrying): %s", e)
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        except asyncio.TimeoutError:
            pass
