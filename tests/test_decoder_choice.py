"""P→D dispatch: the picker's choice by free KV, and a dead decoder's queue moved to the shared one."""

import time

import pytest
from epd.core import subjects
from epd.core.config import Settings
from epd.core.heartbeat import workers_bucket
from epd.core.runtime import Runtime
from epd.schemas.codec import encode
from epd.schemas.status import WorkerStatus
from epd.workers.decoder_choice import DecoderPicker, rescue_orphans
from epd.workers.loop import consumer_config


def decoder(worker_id: str, kv_tokens: int = 0, capacity: int = 1000, age_s: float = 0.0) -> WorkerStatus:
    now = time.time() - age_s
    return WorkerStatus(
        worker_id=worker_id,
        role="decode",
        host="h",
        pid=1,
        started_at=now,
        updated_at=now,
        kv_tokens=kv_tokens,
        kv_capacity=capacity,
    )


@pytest.mark.unit
def test_the_decoder_with_the_most_free_kv_is_chosen() -> None:
    picker = DecoderPicker(read=None)  # type: ignore[arg-type]  # pick() reads nothing
    picker.update([decoder("a", kv_tokens=600), decoder("b", kv_tokens=100), decoder("c", capacity=400)])
    assert picker.pick(100) == "b"  # 900 free, against 400 and 400


@pytest.mark.unit
def test_what_was_sent_since_the_last_beat_counts_against_a_decoder() -> None:
    picker = DecoderPicker(read=None)  # type: ignore[arg-type]  # pick() reads nothing
    picker.update([decoder("a", age_s=0.5), decoder("b", kv_tokens=300, age_s=0.5)])
    assert [picker.pick(400) for _ in range(4)] == ["a", "b", "a", "b"]  # a: 1000, then 600 < b's 700, ...
    picker.update([decoder("a", kv_tokens=800), decoder("b", kv_tokens=200)])  # fresh beats include them
    assert picker.free_tokens(picker.decoders[0]) == 200 and picker.pick(10) == "b"


@pytest.mark.unit
def test_equal_decoders_take_turns_and_no_decoder_means_the_shared_queue() -> None:
    picker = DecoderPicker(read=None)  # type: ignore[arg-type]  # pick() reads nothing
    assert picker.pick(10) is None
    picker.update([decoder("a"), decoder("b"), decoder("c")])
    picker._sent.clear()  # as if every beat already counted what was sent: all equal, every time
    chosen = []
    for _ in range(6):
        chosen.append(picker.pick(10))
        picker._sent.clear()
    assert sorted(chosen[:3]) == ["a", "b", "c"] and chosen[3:] == chosen[:3]  # round robin


@pytest.mark.integration
async def test_a_dead_decoders_queue_moves_to_the_shared_one(infra_settings: Settings) -> None:
    rt = await Runtime.start(infra_settings, "test-rescue")
    try:
        bucket = await workers_bucket(rt.js)
        await bucket.put("decode.alive-1", encode(decoder("alive-1")))
        for worker, request_id in (("ghost-1", "orphan"), ("alive-1", "kept")):
            headers = {subjects.REQUEST_ID_HEADER: request_id, subjects.REPLY_HEADER: f"reply.{request_id}"}
            await rt.js.publish(subjects.decode_for(worker), request_id.encode(), headers=headers)
        assert await rescue_orphans(rt) == 1
        shared = await rt.js.pull_subscribe(subjects.DECODE, durable="decode", config=consumer_config(rt.settings))
        moved = await shared.fetch(1, timeout=5)
        assert moved[0].data == b"orphan" and moved[0].headers[subjects.REPLY_HEADER] == "reply.orphan"
        await moved[0].ack()
        info = await rt.js.stream_info("EPD_DECODE", subjects_filter=subjects.decode_for("*"))
        assert info.state.subjects == {subjects.decode_for("alive-1"): 1}  # a live decoder keeps its own
        assert await rescue_orphans(rt) == 0
    finally:
        await rt.js.purge_stream("EPD_DECODE")
        await bucket.delete("decode.alive-1")
        await rt.close()
