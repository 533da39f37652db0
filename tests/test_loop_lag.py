"""The event loop's lateness: a loop held by a blocking call shows in epd_event_loop_lag_seconds."""

import asyncio
import time

from epd.core.loop_lag import watch_loop_lag
from prometheus_client import REGISTRY


def late(process: str, over_s: float) -> float:
    """Observations of `process`'s lateness over `over_s` seconds (a bucket bound) so far."""
    total = REGISTRY.get_sample_value("epd_event_loop_lag_seconds_count", {"process": process}) or 0.0
    within = REGISTRY.get_sample_value("epd_event_loop_lag_seconds_bucket", {"process": process, "le": str(over_s)})
    return total - (within or 0.0)


async def test_a_blocked_loop_is_seen_late_by_about_the_time_it_was_held() -> None:
    stopping = asyncio.Event()
    watch = asyncio.create_task(watch_loop_lag("test-held", stopping, interval_s=0.01))
    await asyncio.sleep(0.1)  # free: every tick within half a second of its time, even on a busy machine
    assert late("test-held", 0.5) == 0
    time.sleep(0.8)  # the loop held, as a blocking call on it would hold it
    await asyncio.sleep(0.05)
    stopping.set()
    await watch
    assert late("test-held", 0.5) == 1  # one tick, late by the hold
    lag_sum = REGISTRY.get_sample_value("epd_event_loop_lag_seconds_sum", {"process": "test-held"})
    assert 0.7 <= lag_sum < 1.5
