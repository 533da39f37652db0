"""Roles: which stages a worker process runs, and with which connectors.

| role    | consumes                       | encoder cache | KV                 |
|---------|--------------------------------|---------------|--------------------|
| encode  | encode                         | shared (1)    | -                  |
| prefill | prefill, prefill-text          | shared (1)    | sends (Mooncake)   |
| decode  | decode, decode-<its worker id> | -             | receives (Mooncake)|
| pd      | prefill, prefill-text          | shared (1)    | stays in process   |
| epd     | prefill, prefill-text          | in process    | stays in process   |

(1) `EPD_EC_BACKEND`: Mooncake Store (the default) or a shared directory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from epd.connectors.ec import ECConnector
from epd.connectors.ec_memory import InProcessECConnector
from epd.connectors.ec_mooncake import MooncakeECConnector
from epd.connectors.ec_shared_dir import SharedDirECConnector
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


def ec_connector(settings: Settings, store: MooncakeStore) -> ECConnector:
    """The shared encoder cache `EPD_EC_BACKEND` names (the epd role keeps its own in process)."""
    if settings.ec_backend == "shared-dir":
        return SharedDirECConnector(settings.ec_dir, int(settings.ec_capacity_mb * 2**20), settings.verify_checksums)
    return MooncakeECConnector(store, settings.verify_checksums)


def build_role(role: str, rt: Runtime, ckpt: Checkpoint, family: Family) -> Role:
    if role == "epd":
        decoder = Decoder(rt, ckpt, family)
        ec = InProcessECConnector(int(rt.settings.ec_capacity_mb * 2**20))
        prefill = PrefillStage(rt, ckpt, family, ec, local_decode(decoder), inline_encode=True)
        return Role([prefill, text_lane(prefill)])
    store = MooncakeStore(rt.settings)
    if role == "encode":
        return Role([EncodeStage(rt, family, ec_connector(rt.settings, store))], store)
    if role == "prefill":
        kv = MooncakeStoreKVConnector(store, verify=rt.settings.verify_checksums)
        handoff = remote_decode(rt, kv, DecoderPicker(rt))
        prefill = PrefillStage(rt, ckpt, family, ec_connector(rt.settings, store), handoff)
        return Role([prefill, text_lane(prefill)], store)
    if role == "decode":
        decode = DecodeStage(rt, ckpt, family, MooncakeStoreKVConnector(store, verify=rt.settings.verify_checksums))
        mine = subjects.decode_for(rt.worker_id)
        own = Lane(decode, decoder_durable(rt.worker_id), mine, DIRECT_INACTIVE_S, label=subjects.DECODE)
        return Role([decode, own], store, [lambda stop: rescue_loop(rt, stop)])
    if role == "pd":
        handoff = local_decode(Decoder(rt, ckpt, family))
        prefill = PrefillStage(rt, ckpt, family, ec_connector(rt.settings, store), handoff)
        return Role([prefill, text_lane(prefill)], store)
    raise ValueError(f"unknown role {role!r}; roles: encode, prefill, decode, pd, epd")
