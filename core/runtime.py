"""What every worker process shares: the NATS connection, streams, publishing, replies, cancels."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import ssl
import time
import uuid
from dataclasses import dataclass

import msgspec
import nats
from epd.core import subjects
from epd.core.buckets import ensure_buckets
from epd.core.config import Settings
from epd.core.ec_events import Landed
from epd.core.tracing import inject_headers, tracer
from epd.schemas.codec import Decoder, encode
from epd.schemas.control import Cancel
from epd.schemas.reply import ErrorReply, TokenChunk
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

log = logging.getLogger(__name__)


async def connect(settings: Settings, name: str) -> nats.NATS:
    """Connect with the configured credentials (creds file, user and password, or token) and TLS."""
    if not settings.nats_url:
        raise ValueError("no NATS server: pass --nats-url or set EPD_NATS_URL")
    return await nats.connect(
        settings.nats_servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, **nats_auth(settings)
    )


def nats_auth(settings: Settings) -> dict:
    """nats.connect's keyword arguments for credentials and TLS, from the settings."""
    kw: dict = {}
    if settings.nats_creds:
        kw["user_credentials"] = settings.nats_creds
    if settings.nats_user:
        kw["user"], kw["password"] = settings.nats_user, settings.nats_password
    if settings.nats_token:
        kw["token"] = settings.nats_token
    if settings.nats_tls_ca or settings.nats_tls_cert:
        ctx = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
        if settings.nats_tls_cert:
            ctx.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
        kw["tls"] = ctx
    return kw


async def ensure_streams(js: nats.js.JetStreamContext, replicas: int = 1) -> None:
    """Create the per-stage work-queue streams, `replicas` copies each; idempotent, any process may call it."""
    for name, subs in subjects.STREAMS.items():
        cfg = StreamConfig(
            name=name,
            subjects=subs,
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_msg_size=subjects.NATS_MAX_PAYLOAD,
            duplicate_window=120.0,
            num_replicas=replicas,
        )
        try:
            await js.add_stream(cfg)
        except BadRequestError:  # exists with another config: bring it to ours
            await js.update_stream(cfg)


class Cancellations:
    """Request ids cancelled recently; entries expire so the set stays small."""

    def __init__(self, ttl_s: float = 600.0) -> None:
        self._ttl_s = ttl_s
        self._ids: dict[str, float] = {}

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._ids = {k: t for k, t in self._ids.items() if now - t < self._ttl_s}
        self._ids[request_id] = now

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids


@dataclass
class Load:
    """What this process is doing, for its heartbeat (schemas.status.WorkerStatus)."""

    capacity: int = 0
    active: int = 0
    served: int = 0
    failed: int = 0
    ec_hits: int = 0
    ec_misses: int = 0
    kv_tokens: int = 0
    kv_capacity: int = 0
    kv_grants: int = 0
    kv_granted_bytes: int = 0


class Runtime:
    """A worker's I/O: publish to a stage, reply to a client, hear cancels; and its load counters."""

    def __init__(self, settings: Settings, nc: nats.NATS) -> None:
        self.settings = settings
        self.nc = nc
        self.js = nc.jetstream()
        self.cancelled = Cancellations()
        self.load = Load()
        # unique in the pool, and usable as a NATS subject token (no dots, no wildcards)
        host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
        self.worker_id = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._cancel_decoder = Decoder(Cancel)
        self.landed = Landed(nc)  # embeddings announced as they land in the encoder cache (`start` listens)

    @classmethod
    async def start(cls, settings: Settings, name: str) -> Runtime:
        rt = cls(settings, await connect(settings, name))
        await ensure_streams(rt.js, settings.nats_replicas)
        await ensure_buckets(rt.js, settings.nats_replicas, settings.image_ttl_s)
        await rt.nc.subscribe(subjects.CANCEL, cb=rt._on_cancel)
        rt.landed = await Landed(rt.nc).start()
        return rt

    async def _on_cancel(self, msg: nats.aio.msg.Msg) -> None:
        try:
            self.cancelled.add(self._cancel_decoder.decode(msg.data).request_id)
        except ValueError as e:
            log.warning("ignoring bad cancel message: %s", e)

    async def publish(self, subject: str, msg: msgspec.Struct, request_id: str, reply_to: str, stage: str) -> None:
        """Publish a job to a stage's stream; returns once JetStream has stored it. Its span (`publish <stage>`,
        one per hop) holds the encode and the round trip to JetStream; the job's spans downstream keep the
        caller's span as parent (the headers are taken before it starts)."""
        headers = inject_headers(
            {
                "Nats-Msg-Id": f"{request_id}:{stage}",
                subjects.REQUEST_ID_HEADER: request_id,
                subjects.REPLY_HEADER: reply_to,
            }
        )
        with tracer().start_as_current_span(f"publish {stage}", attributes={"messaging.destination.name": subject}):
            await self.js.publish(subject, encode(msg), headers=headers)

    async def reply(self, reply_to: str, msg: TokenChunk | ErrorReply) -> None:
        """One chunk to the client. No trace headers: a chunk per token, and its reader's span already holds it."""
        if reply_to:
            await self.nc.publish(reply_to, encode(msg))

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except (asyncio.TimeoutError, nats.errors.Error):
            await self.nc.close()
