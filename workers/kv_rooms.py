"""Decoders' KV room over NATS: prefill's `KVRooms` client, and a decoder's answering loop.

A decoder answers `epd.v1.kv.reserve.<its worker id>` (request-reply) with a grant of its registered buffer
or a refusal, and frees a grant on a release (fire and forget). The bytes then move on the TransferEngine
(connectors/kv_direct.py), never over NATS.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from epd.connectors.kv_direct import KVLanding
from epd.core import subjects
from epd.schemas.codec import Decoder, WireError, encode
from epd.schemas.decode import KVGrant, KVRelease, KVReserve

log = logging.getLogger(__name__)


class NatsKVRooms:
    """Prefill's side (`kv_direct.KVRooms`)."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self._grants = Decoder(KVGrant)

    async def reserve(self, decoder_id: str, request: KVReserve, timeout_s: float) -> KVGrant | None:
        try:
            reply = await self.nc.request(subjects.kv_reserve_for(decoder_id), encode(request), timeout=timeout_s)
            return self._grants.decode(reply.data)
        except (nats.errors.Error, asyncio.TimeoutError, WireError) as e:
            log.info("decoder %s gave no KV grant (%s)", decoder_id, type(e).__name__)
            return None

    async def release(self, decoder_id: str, grant_id: str) -> None:
        try:
            await self.nc.publish(subjects.kv_reserve_for(decoder_id), encode(KVRelease(grant_id=grant_id)))
        except nats.errors.Error as e:  # the grant expires on its own
            log.warning("cannot release KV grant %s: %s", grant_id, e)


async def serve_kv_rooms(landing: KVLanding, nc: nats.NATS, worker_id: str, stop: asyncio.Event) -> None:
    """A decoder's side: answer its reserve subject, and free expired grants, until `stop`."""
    messages = Decoder(KVReserve | KVRelease)

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        try:
            message = messages.decode(msg.data)
        except WireError as e:
            log.warning("bad KV reservation message: %s", e)
            return
        grant = landing.answer(message)
        if grant is not None and msg.reply:
            await msg.respond(encode(grant))

    sub = await nc.subscribe(subjects.kv_reserve_for(worker_id), cb=on_message)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=min(landing.ttl_s, 1.0))
            except asyncio.TimeoutError:
                landing.expire()
    finally:
        await sub.unsubscribe()
