"""P→D dispatch: a dead decoder's queue moved to the shared one (the picker's choice: test_decoder_picker.py)."""

import pytest
from epd.core import subjects
from epd.core.config import Settings
from epd.core.heartbeat import workers_bucket
from epd.core.runtime import Runtime
from epd.schemas.codec import encode
from epd.workers.decoder_choice import rescue_orphans
from epd.workers.loop import consumer_config

from .test_decoder_picker import worker


@pytest.mark.integration
async def test_a_dead_decoders_queue_moves_to_the_shared_one(infra_settings: Settings) -> None:
    rt = await Runtime.start(infra_settings, "test-rescue")
    try:
        bucket = await workers_bucket(rt.js)
        await bucket.put("decode.alive-1", encode(worker("alive-1")))
        for worker_id, request_id in (("ghost-1", "orphan"), ("alive-1", "kept")):
            headers = {subjects.REQUEST_ID_HEADER: request_id, subjects.REPLY_HEADER: f"reply.{request_id}"}
            await rt.js.publish(subjects.decode_for(worker_id), request_id.encode(), headers=headers)
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
