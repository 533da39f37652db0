"""Roles: which stages a worker process runs, and with which connectors.

| role    | consumes                       | encoder cache | KV                 |
|---------|--------------------------------|---------------|--------------------|
| encode  | encode                         | Mooncake      | -                  |
| prefill | prefill, prefill-text          | Mooncake      | sends (Mooncake)   |
| decode  | decode, decode-<its worker id> | -             | receives (Mooncake)|
| pd      | prefill, prefill-text          | Mooncake      | stays in process   |
| epd     | prefill, prefill-text          | in process    | stays in process   |
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from epd.connectors.ec_memory import InProcessECConnector
from epd.connectors.ec_mooncake import MooncakeECConnector
from epd.connectors.kv_mooncake import MooncakeStoreKVConnector
from epd.connectors.mooncake_store import MooncakeStore
from epd.ops.config import Settings
from epd.schemas import subjects
from epd.workers.decode import Decoder, DecodeStage
from epd.workers.decoder_choice import DIRECT_INACTIVE_S, DecoderPicker, decoder_durable, rescue_loop
from epd.workers.encode import EncodeStage
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.family import Family
from epd.workers.engine.weights import Parts
from epd.workers.loop import Lane, Stage
from epd.workers.prefill import PrefillStage, local_decode, remote_decode
from epd.workers.runtime import Runtime


@dataclass
class Role:
    """What a worker process runs: stage loops, background tasks (run until `stop` is set), a store to close."""

    stages: list[Stage]
    store: MooncakeStore | None = None
    background: list[Callable[[asyncio.Event], Awaitable[None]]] = field(default_factory=list)


def text_lane(prefill: PrefillStage) -> Lane:
    """Text-only requests: a queue and slots of their own, beside the image requests'."""
    return Lane(prefill, "prefill-text", subjects.PREFILL_TEXT)


def weights_for(role: str, settings: Settings) -> Parts:
    """The half of the model a role runs: encoders never run the language model, decoders never the vision
    tower, and prefill runs it only to encode inline (`EPD_INLINE_ENCODE`)."""
    if role == "encode":
        return "vision"
    if role == "decode" or (role in ("prefill", "pd") and not settings.inline_encode):
        return "language"
    return "all"


def build_role(role: str, rt: Runtime, ckpt: Checkpoint, family: Family) -> Role:
    if role == "epd":
        decoder = Decoder(rt, ckpt, family)
        ec = InProcessECConnector()
        prefill = PrefillStage(rt, ckpt, family, ec, local_decode(decoder), inline_encode=True)
        return Role([prefill, text_lane(prefill)])
    store = MooncakeStore(rt.settings)
    if role == "encode":
        return Role([EncodeStage(rt, family, MooncakeECConnector(store))], store)
    if role == "prefill":
        handoff = remote_decode(rt, MooncakeStoreKVConnector(store), DecoderPicker(rt))
        prefill = PrefillStage(rt, ckpt, family, MooncakeECConnector(store), handoff)
        return Role([prefill, text_lane(prefill)], store)
    if role == "decode":
        decode = DecodeStage(rt, ckpt, family, MooncakeStoreKVConnector(store))
        mine = subjects.decode_for(rt.worker_id)
        own = Lane(decode, decoder_durable(rt.worker_id), mine, DIRECT_INACTIVE_S, label=subjects.DECODE)
        return Role([decode, own], store, [lambda stop: rescue_loop(rt, stop)])
    if role == "pd":
        handoff = local_decode(Decoder(rt, ckpt, family))
        prefill = PrefillStage(rt, ckpt, family, MooncakeECConnector(store), handoff)
        return Role([prefill, text_lane(prefill)], store)
    raise ValueError(f"unknown role {role!r}; roles: encode, prefill, decode, pd, epd")
