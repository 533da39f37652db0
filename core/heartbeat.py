"""A worker's heartbeat: its status in the NATS key-value bucket of live workers, every second.

The bucket's TTL drops a worker that stops beating (crashed, partitioned) within a few seconds;
a worker that stops cleanly deletes its own entry. Each beat also reads its stages' queue depths
from JetStream into the `epd_queue_depth` gauge.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import nats
from epd.core import metrics, subjects
from epd.core.runtime import Runtime
from epd.schemas.codec import Decoder, WireError, encode
from epd.schemas.status import WorkerStatus
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

_status_decoder: Decoder[WorkerStatus] = Decoder(WorkerStatus)


async def workers_bucket(js: nats.js.JetStreamContext) -> KeyValue:
    """The live-workers bucket, created on first use by whichever process comes first."""
    try:
        return await js.key_value(subjects.WORKERS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=subjects.WORKERS_BUCKET, ttl=subjects.WORKER_TTL_S, history=1)
        )


async def stage_queue(js: nats.js.JetStreamContext, stream: str, durable: str, subject: str) -> tuple[int, int]:
    """(waiting, being worked on) jobs of a stage; before its consumer exists, all of `subject` waits.

    Raises NotFoundError when the stream itself does not exist.
    """
    try:
        consumer = await js.consumer_info(stream, durable)
        return consumer.num_pending, consumer.num_ack_pending
    except nats.js.errors.NotFoundError:
        info = await js.stream_info(stream, subjects_filter=subject)
        return sum((info.state.subjects or {}).values()), 0


class Heartbeat:
    def __init__(self, rt: Runtime, role: str, stages: list[tuple[str, str]], metrics_url: str) -> None:
        """`stages`: (durable consumer name, subject) of each stage this worker runs."""
        self.rt, self.role, self.stages, self.metrics_url = rt, role, stages, metrics_url
        self.worker_id = rt.worker_id
        self.key = f"{role}.{self.worker_id}"
        self.started_at = time.time()
        self._kv: KeyValue | None = None

    def status(self) -> WorkerStatus:
        load = self.rt.load
        return WorkerStatus(
            worker_id=self.worker_id,
            role=self.role,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.started_at,
            updated_at=time.time(),
            metrics_url=self.metrics_url,
            capacity=load.capacity,
            active=load.active,
            served=load.served,
            failed=load.failed,
            ec_hits=load.ec_hits,
            ec_misses=load.ec_misses,
            kv_tokens=load.kv_tokens,
            kv_capacity=load.kv_capacity,
            kv_grants=load.kv_grants,
            kv_granted_bytes=load.kv_granted_bytes,
        )

    async def beat(self) -> None:
        if self._kv is None:
            self._kv = await workers_bucket(self.rt.js)
        await self._kv.put(self.key, encode(self.status()))
        for durable, subject in self.stages:
            waiting, _ = await stage_queue(self.rt.js, subjects.stream_of(subject), durable, subject)
            metrics.QUEUE_DEPTH.labels(durable).set(waiting)

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every `HEARTBEAT_S` until `stop` is set, then leave the pool."""
        while not stop.is_set():
            try:
                await self.beat()
            except (nats.errors.Error, asyncio.TimeoutError) as e:  # NATS away: the next beat retries
                log.warning("heartbeat failed: %s", e)
            try:
                await asyncio.wait_for(stop.wait(), timeout=subjects.HEARTBEAT_S)
            except asyncio.TimeoutError:
                pass
        if self._kv is not None:
            try:
                await self._kv.delete(self.key)
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                log.warning("could not leave the worker pool (the TTL will): %s", e)


async def live_workers(js: nats.js.JetStreamContext) -> list[WorkerStatus]:
    """Every worker whose heartbeat is within the TTL, oldest first.

    Read from the bucket's stream by request and reply (which subjects hold a message, then the last
    message of each), not with a key watcher, whose end-of-keys signal can come before the keys.
    """
    await workers_bucket(js)
    stream = f"KV_{subjects.WORKERS_BUCKET}"
    prefix = f"$KV.{subjects.WORKERS_BUCKET}."
    info = await js.stream_info(stream, subjects_filter=prefix + ">")
    out = []
    for subject in info.state.subjects or {}:
        try:
            msg = await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:  # expired between the two requests
            continue
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
            continue  # a worker that left
        try:
            out.append(_status_decoder.decode(msg.data))
        except WireError:
            log.warning("ignoring a malformed heartbeat under %s", subject)
    return sorted(out, key=lambda w: w.started_at)
