"""The JetStream worker loop against a real NATS server, with a stand-in stage."""

import asyncio

import nats
import pytest
from epd.core import subjects
from epd.core.config import Settings
from epd.core.runtime import Runtime
from epd.schemas.codec import Decoder, encode
from epd.schemas.control import Cancel
from epd.schemas.reply import ErrorReply, Reply, TokenChunk
from epd.workers.errors import RequestFailed
from epd.workers.loop import StageLoop

pytestmark = pytest.mark.integration


class EchoStage:
    """Replies with the request id; fails on request for a failure."""

    name = durable = "test-echo"
    subject = label = "epd.test.echo"
    inactive_s = None
    capacity = 2
    message_type = Cancel

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.handled: list[str] = []

    async def handle(self, job: Cancel) -> None:
        self.handled.append(job.request_id)
        if job.request_id == "bad-request":
            raise RequestFailed(400, "this request is malformed")
        if job.request_id == "crash":
            raise RuntimeError("boom")
        await self.rt.reply(
            f"reply.{job.request_id}", TokenChunk(request_id=job.request_id, seq=0, token_ids=[], text="ok")
        )


async def test_errors_reach_the_client_and_the_worker_serves_on(infra_settings: Settings) -> None:
    rt = await Runtime.start(infra_settings.replace(ack_wait_s=5.0), "test")
    await rt.js.add_stream(name="EPD_TEST", subjects=["epd.test.>"])
    stage = EchoStage(rt)
    loop = StageLoop(stage, rt)
    task = asyncio.create_task(loop.run())
    client = await nats.connect(infra_settings.nats_url)
    replies = Decoder(Reply)
    try:
        inbox = await client.subscribe("reply.>")

        async def send(rid: str, data: bytes | None = None) -> None:
            headers = {subjects.REQUEST_ID_HEADER: rid, subjects.REPLY_HEADER: f"reply.{rid}"}
            await rt.js.publish(
                stage.subject, data if data is not None else encode(Cancel(request_id=rid)), headers=headers
            )

        await send("garbage", b"\x00\x01 not msgpack")
        await send("bad-request")
        await send("crash")
        await send("fine")
        got = {}
        for _ in range(4):
            msg = await inbox.next_msg(timeout=10)
            got[msg.subject] = replies.decode(msg.data)
        assert isinstance(got["reply.garbage"], ErrorReply) and got["reply.garbage"].status == 400
        assert "invalid Cancel message" in got["reply.garbage"].message
        assert (
            got["reply.bad-request"].status == 400 and got["reply.bad-request"].message == "this request is malformed"
        )
        assert got["reply.crash"].status == 500 and "boom" in got["reply.crash"].message
        assert isinstance(got["reply.fine"], TokenChunk)
        info = await rt.js.consumer_info("EPD_TEST", stage.name)
        for _ in range(50):  # every message acked, none waiting for redelivery
            if info.num_ack_pending == 0 and info.num_pending == 0:
                break
            await asyncio.sleep(0.1)
            info = await rt.js.consumer_info("EPD_TEST", stage.name)
        assert info.num_ack_pending == 0 and info.num_pending == 0
        assert sorted(stage.handled) == ["bad-request", "crash", "fine"]  # garbage never reached the stage
    finally:
        loop.stop()
        await asyncio.wait_for(task, 10)
        await client.close()
        await rt.js.delete_stream("EPD_TEST")
        await rt.close()


async def test_a_request_that_exhausts_its_deliveries_is_answered(infra_settings: Settings) -> None:
    """A worker that takes a message and dies (never acks) `max_deliver` times: the client gets a 503."""
    from epd.gateway.dead_letters import watch_dead_letters
    from nats.js.api import ConsumerConfig

    rt = await Runtime.start(infra_settings, "test-dead-letters")
    await rt.js.add_stream(name="EPD_DEAD", subjects=["epd.dead.>"])
    await watch_dead_letters(rt, ["EPD_DEAD"])
    client = await nats.connect(infra_settings.nats_url)
    try:
        inbox = await client.subscribe("reply.dead")
        headers = {subjects.REQUEST_ID_HEADER: "doomed", subjects.REPLY_HEADER: "reply.dead"}
        await rt.js.publish("epd.dead.job", b"payload", headers=headers)
        sub = await rt.js.pull_subscribe(
            "epd.dead.job", durable="crashy", config=ConsumerConfig(ack_wait=0.5, max_deliver=2)
        )
        for _ in range(2):  # take it and "crash": no ack, wait for redelivery
            msgs = await sub.fetch(1, timeout=5)
            assert msgs[0].metadata.num_delivered >= 1
        with pytest.raises(nats.errors.TimeoutError):  # workers keep pulling: JetStream gives up on it
            await sub.fetch(1, timeout=2)
        reply = Decoder(Reply).decode((await inbox.next_msg(timeout=10)).data)
        assert isinstance(reply, ErrorReply) and reply.status == 503 and reply.request_id == "doomed"
        assert "failed 2 times" in reply.message
        for _ in range(20):
            if (await rt.js.stream_info("EPD_DEAD")).state.messages == 0:
                break
            await asyncio.sleep(0.1)
        assert (await rt.js.stream_info("EPD_DEAD")).state.messages == 0  # answered, then removed
    finally:
        await client.close()
        await rt.js.delete_stream("EPD_DEAD")
        await rt.close()


class CrashOnceStage:
    """The first delivery dies mid-work (no ack, as when the process is killed); the next one succeeds."""

    name = durable = "test-redeliver"
    subject = label = "epd.redeliver.job"
    inactive_s = None
    capacity = 1
    message_type = Cancel

    def __init__(self) -> None:
        self.attempts = 0

    async def handle(self, job: Cancel) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise asyncio.CancelledError  # escapes the error boundary: no reply, no ack


async def test_a_redelivered_job_links_to_its_first_attempt(infra_settings: Settings) -> None:
    from epd.core.tracing import inject_headers, make_provider
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = make_provider("test-loop")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    trace.set_tracer_provider(provider)  # the loop uses the global provider

    rt = await Runtime.start(infra_settings.replace(ack_wait_s=1.0), "test-redeliver")
    await rt.js.add_stream(name="EPD_REDELIVER", subjects=["epd.redeliver.>"])
    stage = CrashOnceStage()
    loop = StageLoop(stage, rt)
    task = asyncio.create_task(loop.run())
    try:
        with tracer.start_as_current_span("publisher") as publisher:
            headers = inject_headers({"Nats-Msg-Id": "r1:test", subjects.REQUEST_ID_HEADER: "r1"})
            await rt.js.publish(stage.subject, encode(Cancel(request_id="r1")), headers=headers)
        for _ in range(100):  # redelivered after ack_wait (1 s)
            if stage.attempts >= 2:
                break
            await asyncio.sleep(0.1)
        assert stage.attempts == 2
        for _ in range(50):
            runs = [s for s in exporter.get_finished_spans() if s.name == f"{stage.name} {stage.subject}"]
            if len(runs) == 2:
                break
            await asyncio.sleep(0.1)
        first, second = sorted(runs, key=lambda s: s.attributes["epd.attempt"])
        assert (first.attributes["epd.attempt"], second.attributes["epd.attempt"]) == (1, 2)
        pub = publisher.get_span_context()
        assert first.parent.span_id == pub.span_id and second.parent.span_id == pub.span_id
        assert [lk.context.span_id for lk in second.links] == [first.context.span_id]
        assert second.links[0].context.trace_id == pub.trace_id
        queues = [s for s in exporter.get_finished_spans() if s.name == f"queue {stage.name}"]
        assert len(queues) == 2 and all(s.end_time >= s.start_time for s in queues)
    finally:
        loop.stop()
        await asyncio.wait_for(task, 10)
        await rt.js.delete_stream("EPD_REDELIVER")
        await rt.close()
