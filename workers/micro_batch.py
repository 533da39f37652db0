"""Dynamic batching for encode and prefill: what arrives while the model is busy runs together.

A stage handles each message in its own task (one per slot). Each task submits its
item and awaits its result; a single runner takes everything queued, up to
`max_batch` items and `max_cost`, runs it as one forward in a thread, and hands each
task its part. Nothing waits for a batch to fill: an idle worker runs a lone request
at once, and a busy one batches whatever queued meanwhile.

When a batch fails, its items run again one by one, so that one bad request (an image
the processor refuses) fails alone and the others in its batch are served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

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
    ) -> None:
        """`run` maps items to results in order; `cost` prices a candidate batch (the first item always goes)."""
        self.run, self.max_batch, self.stage, self.cost, self.max_cost = run, max_batch, stage, cost, max_cost
        self._queue: list[tuple[T, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None

    async def submit(self, item: T) -> tuple[R, int]:
        """`item`'s result, and the size of the batch it ran in."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
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
        return queue[:n]

    async def _drain(self) -> None:
        try:
            while batch := self._take():
                metrics.BATCH_SIZE.labels(self.stage).observe(len(batch))
                try:
                    results = await asyncio.to_thread(self.run, [i for i, _ in batch])
                except Exception as e:
                    if len(batch) == 1:
                        _settle(batch[0][1], error=e)
                        continue
                    log.info("%s: a batch of %d failed (%s); running its items one by one", self.stage, len(batch), e)
                    for item, future in batch:
                        try:
                            _settle(future, (await asyncio.to_thread(self.run, [item]))[0], 1)
                        except Exception as one:
                            _settle(future, error=one)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    _settle(future, result, len(batch))
        finally:
            self._runner = None


def _settle(future: asyncio.Future, result: object = None, size: int = 0, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result((result, size))
