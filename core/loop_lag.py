"""The event loop's lateness, watched: a timer due every `interval_s`, and by how much it ran late.

A worker's event loop fetches jobs, sends replies and hands work to the threads that run the model; a loop that
is held (a blocking call on it, a wait for the GPU, other threads keeping the GIL) delays all of that at once.
The lateness goes to `epd_event_loop_lag_seconds`.
"""

from __future__ import annotations

import asyncio

from epd.core import metrics


async def watch_loop_lag(process: str, stopping: asyncio.Event, interval_s: float = 0.05) -> None:
    """Observe the running loop's lateness under the label `process` until `stopping` is set."""
    loop, lag = asyncio.get_running_loop(), metrics.LOOP_LAG.labels(process)
    while not stopping.is_set():
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        lag.observe(max(0.0, loop.time() - due))
