"""The decoder choice (workers/decoder_choice.py's picker) through `choose`, with a fake heartbeat reader: no NATS."""

from __future__ import annotations

import time

import nats
import pytest
from epd.schemas.status import WorkerStatus
from epd.workers.decoder_choice import DecoderPicker

pytestmark = pytest.mark.unit


def worker(
    worker_id: str, role: str = "decode", kv_tokens: int = 0, capacity: int = 1000, age_s: float = 0.0
) -> WorkerStatus:
    now = time.time() - age_s
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


def test_the_decoder_with_the_most_free_kv_is_chosen() -> None:
    picker = DecoderPicker(read=None)  # type: ignore[arg-type]  # pick() reads nothing
    picker.update([worker("a", kv_tokens=600), worker("b", kv_tokens=100), worker("c", capacity=400)])
    assert picker.pick(100) == "b"  # 900 free, against 400 and 400


def test_what_was_sent_since_the_last_beat_counts_against_a_worker() -> None:
    picker = DecoderPicker(read=None)  # type: ignore[arg-type]  # pick() reads nothing
    picker.update([worker("a", age_s=0.5), worker("b", kv_tokens=300, age_s=0.5)])
    assert [picker.pick(400) for _ in range(4)] == ["a", "b", "a", "b"]  # a: 1000, then 600 < b's 700, ...
    picker.update([worker("a", kv_tokens=800), worker("b", kv_tokens=200)])  # fresh beats include them
    assert picker.free_tokens(picker.decoders[0]) == 200 and picker.pick(10) == "b"


def test_equal_decoders_take_turns_and_no_decoder_means_the_shared_queue() -> None:
    picker = DecoderPicker(read=None)  # type: ignore[arg-type]  # pick() reads nothing
    assert picker.pick(10) is None
    picker.update([worker("a"), worker("b"), worker("c")])
    picker._sent.clear()  # as if every beat already counted what was sent: all equal, every time
    chosen = []
    for _ in range(6):
        chosen.append(picker.pick(10))
        picker._sent.clear()
    assert sorted(chosen[:3]) == ["a", "b", "c"] and chosen[3:] == chosen[:3]  # round robin
