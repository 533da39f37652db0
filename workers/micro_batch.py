"""Dynamic batching for encode and prefill: what arrives while the model is busy runs together.

A stage handles each message in its own task (one per slot). Each task submits its
item and awaits its result; a single runner takes everything queued, up to
`max_batch` items and `max_cost`, runs it as one forward in a thread, and hands each
task its part. Nothing waits for a batch to fill: an idle worker runs a lone request
at once, and a busy one batches whatever queued meanwhile.

When a batch fails, its items run again one by one, so that one bad request (an image
the processor refuses) fails alone and the others in its batch are served.

With a `prepare` stage the batcher is a two-stage pipeline: while batch N runs (`run`, in a
thread: on a GPU the forward), batch N+1 is taken from the queue and prepared (`prepare`, in
another thread: the encoder's image preprocessing and upload), so the device does not wait for
the host's work between batches. What arrives after N+1 was taken waits for N+2.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from epd.core import metrics

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        max_batch: int,
        stage: str,
        cost: Callable[[list[T]], float] = len,
        max_cost: float = float("inf"),
        prepare: Callable[[list[T]], Any] | None = None,
    ) -> None:
        """`run` maps items to results in order (given `prepare`, it maps what `prepare` made of the items);
        `cost` prices a candidate batch (the first item always goes)."""
        self.run, self.max_batch, self.stage, self.cost, self.max_cost = run, max_batch, stage, cost, max_cost
        self.prepare = prepare
        self._queue: list[tuple[T, asyncio.Future]] = []
        self._urgent: set[asyncio.Future] = set()  # the queue's head: urgent items, in their order
        self._runner: asyncio.Task | None = None

    async def submit(self, item: T, urgent: bool = False) -> tuple[R, int]:
        """`item`'s result, and the size of the batch it ran in. An `urgent` item goes ahead of every item that
        is not, so that it waits at most for the batch running now (prefill: text-only prompts before pictures'
        long ones)."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if urgent:
            head = next((n for n, (_, f) in enumerate(self._queue) if f not in self._urgent), len(self._queue))
            self._queue.insert(head, (item, future))
            self._urgent.add(future)
        else:
            self._queue.append((item, future))
        if self._runner is None:
            self._runner = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[T, asyncio.Future]]:
        queue = [(i, f) for i, f in self._queue if not f.done()]  # the caller may have given up
        n = 1
        while n < min(len(queue), self.max_batch) and self.cost([i for i, _ in queue[: n + 1]]) <= self.max_cost:
            n += 1
        self._queue = queue[n:]
        self._urgent.intersection_update(f for _, f in self._queue)
        return queue[:n]

    def _work(self, items: list[T]) -> list[R]:
        return self.run(items if self.prepare is None else self.prepare(items))

    def _start(self) -> tuple[list[tuple[T, asyncio.Future]], asyncio.Future | None] | None:
        """The next batch, and (with `prepare`) its preparation started in a thread."""
        batch = self._take()
        if not batch:
            return None
        prepared = None
        if self.prepare is not None:
            prepared = asyncio.ensure_future(asyncio.to_thread(self.prepare, [i for i, _ in batch]))
        return batch, prepared

    async def _drain(self) -> None:
        try:
            nxt = self._start()
            while nxt is not None:
                batch, prepared = nxt
                metrics.BATCH_SIZE.labels(self.stage).observe(len(batch))
                try:
                    if prepared is None:
                        running = asyncio.ensure_future(asyncio.to_thread(self.run, [i for i, _ in batch]))
                    else:
                        running = asyncio.ensure_future(asyncio.to_thread(self.run, await prepared))
                except Exception as e:  # the preparation failed: nothing runs, the next batch is not taken yet
                    nxt = None
                    running = asyncio.get_running_loop().create_future()
                    running.set_exception(e)
                else:
                    nxt = self._start() if self.prepare is not None else None  # prepared while this one runs
                try:
                    results = await running
                except Exception as e:
                    await self._one_by_one(batch, e)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        _settle(future, result, len(batch))
                if nxt is None:
                    nxt = self._start()
        finally:
            self._runner = None

    async def _one_by_one(self, batch: list[tuple[T, asyncio.Future]], e: Exception) -> None:
        if len(batch) == 1:
            _settle(batch[0][1], error=e)
            return
        log.info("%s: a batch of %d failed (%s); running its items one by one", self.stage, len(batch), e)
        for item, future in batch:
            try:
                _settle(future, (await asyncio.to_thread(self._work, [item]))[0], 1)
            except Exception as one:
                _settle(future, error=one)


def _settle(future: asyncio.Future, result: object = None, size: int = 0, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result((result, size))
