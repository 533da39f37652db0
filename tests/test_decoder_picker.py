"""The decoder choice (workers/decoder_choice.py's picker) through `choose`, with a fake heartbeat reader: no NATS."""

from __future__ import annotations

import time

import nats
import pytest
from epd.schemas.status import WorkerStatus
from epd.workers.decoder_choice import DecoderPicker

pytestmark = pytest.mark.unit


def worker(worker_id: str, role: str = "decode", kv_tokens: int = 0, capacity: int = 1000) -> WorkerStatus:
    now = time.time()
    return WorkerStatus(
        worker_id=worker_id,
        role=role,
        host="h",
        pid=1,
        started_at=now,
        updated_at=now,
        kv_tokens=kv_tokens,
        kv_capacity=capacity,
    )


class Heartbeats:
    """What `live_workers` would read; `fail` makes the next read fail as NATS away would."""

    def __init__(self, workers: list[WorkerStatus]) -> None:
        self.workers, self.reads, self.fail = workers, 0, False

    async def read(self) -> list[WorkerStatus]:
        self.reads += 1
        if self.fail:
            raise nats.errors.ConnectionClosedError
        return list(self.workers)


async def test_only_decoders_are_chosen_and_the_one_with_most_free_kv_first() -> None:
    beats = Heartbeats([worker("p", role="prefill"), worker("a", kv_tokens=700), worker("b", kv_tokens=200)])
    picker = DecoderPicker(beats.read)
    assert await picker.choose(100) == "b"
    assert [w.worker_id for w in picker.decoders] == ["a", "b"]


async def test_the_view_is_read_once_per_refresh_and_no_decoder_means_the_shared_queue() -> None:
    beats = Heartbeats([])
    picker = DecoderPicker(beats.read, refresh_s=3600.0)
    assert await picker.choose(10) is None  # nobody heartbeats: the shared decode queue
    beats.workers = [worker("a")]
    assert await picker.choose(10) is None and beats.reads == 1  # within the refresh: the view it has
    picker = DecoderPicker(beats.read, refresh_s=-1.0)  # (a refresh every time)
    assert [await picker.choose(10) for _ in range(3)] == ["a"] * 3 and beats.reads == 4


async def test_a_failed_read_keeps_the_last_view() -> None:
    beats = Heartbeats([worker("a", kv_tokens=900), worker("b")])
    picker = DecoderPicker(beats.read, refresh_s=-1.0)
    assert await picker.choose(500) == "b"
    beats.fail = True
    # the failed read changed nothing it knew: b had 1000 free, 500 sent since (500, then 200, then -100); a has 100
    assert [await picker.choose(300) for _ in range(3)] == ["b", "b", "a"]
    assert beats.reads == 4
