"""The JetStream worker loop, written once for every role.

1. fetch at most as many messages as there are free slots (pull = least-loaded dispatch);
2. run each in its own task, telling JetStream `in_progress` while it works;
3. ack once the stage's output is published, or answer the client with an error and ack.

A message that crashes its process is redelivered after `ack_wait`, up to `max_deliver` times. A worker
tells JetStream `in_progress` KEEPALIVES times per ack wait while it works, so the ack wait can be short
(`EPD_ACK_WAIT_S`, 5 s): a job whose worker died goes to another within seconds, however long jobs run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import nullcontext
from typing import Any, Protocol

import nats
from epd.connectors.mooncake_store import StoreError
from epd.core import metrics, subjects
from epd.core.config import Settings
from epd.core.outbox import RuntimeOutbox
from epd.core.runtime import Runtime
from epd.core.tracing import attempt_span_id, extract_context, fixed_span_id, tracer
from epd.schemas.codec import Decoder, WireError
from epd.schemas.reply import ErrorReply
from epd.workers.errors import RequestFailed
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

STORE_WAIT_S = 60.0  # how long a job waits for the Mooncake store to come back before failing with a 503
KEEPALIVES = 5  # in_progress signals per ack wait: a few may be late (a busy event loop) before a redelivery


class Stage(Protocol):
    """A role's pure part: what it consumes and how it handles one decoded message."""

    name: str  # the stage, in spans, metrics and error replies
    durable: str  # the JetStream consumer, shared by every worker of this stage (a stage's own: its name)
    subject: str  # what the consumer reads
    label: str  # the subject its spans name (a lane's own subject can hold a worker id)
    inactive_s: float | None  # delete the consumer when nobody has pulled for this long (None: never)
    capacity: int  # messages handled at once
    message_type: Any

    async def handle(self, job: Any) -> None: ...


class Lane:
    """A stage fed from another queue: its own subject, durable consumer and slots, the same handler.

    Text-only prefill is a lane beside the image one, so image requests cannot starve it; a decoder's
    own lane receives the requests that prefill chose it for. Spans and metrics keep the stage's name.
    """

    def __init__(
        self, stage: Stage, durable: str, subject: str, inactive_s: float | None = None, label: str | None = None
    ) -> None:
        """`label`: the subject spans name (default `subject`), for a subject with a worker id in it."""
        self.stage, self.durable, self.subject, self.inactive_s = stage, durable, subject, inactive_s
        self.name, self.capacity, self.message_type = stage.name, stage.capacity, stage.message_type
        self.label = label or subject

    async def handle(self, job: Any) -> None:
        await self.stage.handle(job)


def consumer_config(settings: Settings, inactive_s: float | None = None) -> ConsumerConfig:
    """Every stage consumer's settings; `inactive_s`: delete it when nobody has pulled for that long."""
    return ConsumerConfig(
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=-1,
        inactive_threshold=inactive_s,
    )


class StageLoop:
    def __init__(self, stage: Stage, rt: Runtime) -> None:
        self.stage = stage
        self.rt = rt
        self.out = RuntimeOutbox(rt)
        self._decoder: Decoder = Decoder(stage.message_type)
        self._tasks: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        durable = self.stage.durable
        sub = await self.rt.js.pull_subscribe(
            self.stage.subject,
            durable=durable,
            config=consumer_config(self.rt.settings, self.stage.inactive_s),
        )
        self.rt.load.capacity += self.stage.capacity
        log.info("%s: consuming %s (capacity %d)", durable, self.stage.subject, self.stage.capacity)
        while not self._stopping.is_set():
            free = self.stage.capacity - len(self._tasks)
            if free <= 0:
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                # One at a time, though slots are free: a pull for several would take every waiting job at
                # once, and an idle peer none (a request's images split over encoders would all land on one).
                # Fetching again at once, a busy worker still fills its slots, and its batches form.
                msgs = await sub.fetch(1, timeout=1.0)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except nats.js.errors.ServiceUnavailableError:  # a cluster electing the consumer's leader (a node lost)
                log.warning("%s: JetStream unavailable for now; fetching again", durable)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._process(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if self._tasks:  # drain: finish what was accepted
            await asyncio.wait(self._tasks)
        await sub.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    async def _process(self, msg: nats.aio.msg.Msg) -> None:
        headers = msg.headers or {}
        request_id = headers.get(subjects.REQUEST_ID_HEADER, "")
        reply_to = headers.get(subjects.REPLY_HEADER, "")
        stage = self.stage.name
        parent = extract_context(headers)
        attempt = msg.metadata.num_delivered
        _queue_span(stage, parent, msg, request_id, attempt)
        # The first delivery's span id is derived from the message, so a redelivery can link to it.
        origin = trace.get_current_span(parent).get_span_context()
        first_id = attempt_span_id(origin.trace_id, headers.get("Nats-Msg-Id", f"{request_id}:{stage}"))
        links = []
        if attempt > 1 and origin.is_valid:
            first = SpanContext(origin.trace_id, first_id, is_remote=True, trace_flags=origin.trace_flags)
            links.append(Link(first, {"epd.link": "first attempt"}))
        with fixed_span_id(first_id) if attempt == 1 else nullcontext():
            span = tracer().start_span(
                f"{stage} {self.stage.label}",
                context=parent,
                kind=SpanKind.CONSUMER,
                links=links,
                attributes={
                    "epd.request_id": request_id,
                    "epd.stage": stage,
                    "epd.attempt": attempt,
                    "messaging.destination.name": msg.subject,
                },
            )
        load = self.rt.load
        load.active += 1
        metrics.IN_FLIGHT.labels(stage).inc()
        started = time.perf_counter()
        with trace.use_span(span, end_on_exit=True):
            keepalive = asyncio.create_task(self._keep_alive(msg))
            try:
                await self._handle(msg, request_id)
            except StoreError as e:  # the Mooncake master stayed away past the wait: the client may retry
                await self._fail(
                    span, request_id, reply_to, 503, f"the Mooncake store is unavailable: {e}", "server_error"
                )
            except WireError as e:
                await self._fail(span, request_id, reply_to, 400, str(e), "invalid_request_error")
            except RequestFailed as e:
                await self._fail(span, request_id, reply_to, e.status, str(e), e.type, e.resumable)
            except Exception as e:  # the per-request error boundary: this request fails, the worker serves on
                log.exception("%s: request %s failed", stage, request_id)
                await self._fail(span, request_id, reply_to, 500, f"{type(e).__name__}: {e}", "server_error")
            finally:
                keepalive.cancel()
                load.active -= 1
                load.served += 1
                metrics.IN_FLIGHT.labels(stage).dec()
                metrics.STAGE_DURATION.labels(stage).observe(time.perf_counter() - started)
            await msg.ack()

    async def _handle(self, msg: nats.aio.msg.Msg, request_id: str) -> None:
        """The stage's handler; run again while the Mooncake store is unavailable (its master restarting: the
        clients take some seconds to mount their segments again), up to `STORE_WAIT_S`. Running a handler
        again is what a redelivery does: its replies and publishes are de-duplicated downstream."""
        job = self._decoder.decode(msg.data)
        deadline, delay = time.monotonic() + STORE_WAIT_S, 0.5
        while True:
            try:
                return await self.stage.handle(job)
            except StoreError as e:
                if time.monotonic() + delay > deadline or request_id in self.rt.cancelled:
                    raise
                log.warning(
                    "%s: request %s: store unavailable (%s); again in %.1fs", self.stage.name, request_id, e, delay
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, 4.0)

    async def _keep_alive(self, msg: nats.aio.msg.Msg) -> None:
        while True:
            await asyncio.sleep(self.rt.settings.ack_wait_s / KEEPALIVES)
            try:
                await msg.in_progress()
            except nats.errors.Error as e:  # NATS away for a moment: the next one may pass
                log.debug("in_progress failed: %s", e)

    async def _fail(
        self,
        span: trace.Span,
        request_id: str,
        reply_to: str,
        status: int,
        message: str,
        type_: str,
        resumable: bool = False,
    ) -> None:
        span.set_status(Status(StatusCode.ERROR, message))
        span.set_attribute("error.type", type_)
        self.rt.load.failed += 1
        metrics.ERRORS.labels(self.stage.name, type_).inc()
        log.warning("%s: request %s -> %d %s", self.stage.name, request_id, status, message)
        error = ErrorReply(
            request_id=request_id, seq=-1, status=status, message=message, type=type_, resumable=resumable
        )
        await self.out.error(reply_to, error)


def _queue_span(stage: str, parent: Context, msg: nats.aio.msg.Msg, request_id: str, attempt: int) -> None:
    """The time a job sat in its stream: from JetStream storing it to this worker fetching it."""
    stored_ns = int(msg.metadata.timestamp.timestamp() * 1e9)
    now_ns = time.time_ns()
    waited_ns = max(0, now_ns - stored_ns)
    metrics.QUEUE_WAIT.labels(stage).observe(waited_ns / 1e9)
    span = tracer().start_span(
        f"queue {stage}",
        context=parent,
        kind=SpanKind.INTERNAL,
        start_time=min(stored_ns, now_ns),
        attributes={
            "epd.request_id": request_id,
            "epd.stage": stage,
            "epd.attempt": attempt,
            "messaging.system": "nats",
            "messaging.destination.name": msg.subject,
        },
    )
    span.end(end_time=now_ns)
