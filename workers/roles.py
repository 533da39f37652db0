"""Roles: which stages a worker process runs, and with which connectors.

| role    | consumes                       | encoder cache | KV                 |
|---------|--------------------------------|---------------|--------------------|
| encode  | encode                         | shared (1)    | -                  |
| prefill | prefill, prefill-text          | shared (1)    | sends (2)          |
| decode  | decode, decode-<its worker id> | -             | receives (2)       |
| pd      | prefill, prefill-text          | shared (1)    | stays in process   |
| epd     | prefill, prefill-text          | in process    | stays in process   |

(1) `EPD_EC_BACKEND`: Mooncake Store (the default) or a shared directory.
(2) `EPD_KV_TRANSFER`: layer by layer into the decoder's memory on the Mooncake TransferEngine
    (the default), or through Mooncake Store; the store is also the direct path's fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from epd.connectors.ec import ECConnector
from epd.connectors.ec_memory import InProcessECConnector
from epd.connectors.ec_mooncake import MooncakeECConnector
from epd.connectors.ec_shared_dir import SharedDirECConnector
from epd.connectors.kv import KVConnector
from epd.connectors.kv_direct import DirectKVConnector, KVLanding
from epd.connectors.kv_mooncake import MooncakeStoreKVConnector
from epd.connectors.mooncake_store import MooncakeStore
from epd.connectors.transfer_engine import TransferLink
from epd.core import subjects
from epd.core.config import Settings
from epd.core.heartbeat import live_workers
from epd.core.runtime import Runtime
from epd.schemas.decode import KVPath
from epd.workers.decode import Decoder, DecodeStage
from epd.workers.decoder_choice import DIRECT_INACTIVE_S, DecoderPicker, decoder_durable, rescue_loop
from epd.workers.encode import EncodeStage, FamilyEncoder
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.family import Family
from epd.workers.engine.weights import Parts
from epd.workers.kv_rooms import NatsKVRooms, serve_kv_rooms
from epd.workers.loop import Lane, Stage
from epd.workers.prefill import LocalDecode, PrefillStage, RemoteDecode
from epd.workers.services import Services


@dataclass
class Role:
    """What a worker process runs: stage loops, background tasks (run until `stop` is set), a store to close,
    and an engine to stop once the stages have drained (vLLM's, whose engine runs in a process of its own)."""

    stages: list[Stage]
    store: MooncakeStore | None = None
    background: list[Callable[[asyncio.Event], Awaitable[None]]] = field(default_factory=list)
    shutdown: Callable[[], None] | None = None


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


def ec_connector(settings: Settings, store: MooncakeStore | None) -> ECConnector:
    """The shared encoder cache `EPD_EC_BACKEND` names (the epd role keeps its own in process); `store`: the
    process's Mooncake Store client, which the shared-dir backend does without."""
    if settings.ec_backend == "shared-dir":
        return SharedDirECConnector(settings.ec_dir, int(settings.ec_capacity_mb * 2**20), settings.verify_checksums)
    if store is None:
        raise ValueError("EPD_EC_BACKEND=mooncake needs a Mooncake Store client")
    return MooncakeECConnector(store, settings.verify_checksums)


def build_role(role: str, rt: Runtime, ckpt: Checkpoint, family: Family) -> Role:
    sv = Services.of(rt)
    if role == "epd":
        decoder = Decoder(sv, ckpt, family)
        ec = InProcessECConnector(int(rt.settings.ec_capacity_mb * 2**20))
        prefill = PrefillStage(sv, ckpt, family, ec, LocalDecode(decoder), shared_cache=False)
        return Role([prefill, text_lane(prefill)])
    store = MooncakeStore(rt.settings)
    if role == "encode":
        ec = ec_connector(rt.settings, store)
        return Role([EncodeStage(sv, FamilyEncoder(family, ec, rt.settings.max_batch), ec)], store)
    settings = rt.settings
    if role == "prefill":
        kv = MooncakeStoreKVConnector(store, verify=settings.verify_checksums)
        direct = None
        if settings.kv_transfer == "direct":
            direct = DirectKVConnector(TransferLink(settings, settings.kv_buffer_mb), rooms=NatsKVRooms(rt.nc))
        picker = DecoderPicker(lambda: live_workers(rt.js))
        handoff = RemoteDecode(sv, family.kv_layout(), kv, picker, direct)
        prefill = PrefillStage(sv, ckpt, family, ec_connector(settings, store), handoff)
        return Role([prefill, text_lane(prefill)], store)
    if role == "decode":
        paths: dict[KVPath, KVConnector] = {
            KVPath.STORE: MooncakeStoreKVConnector(store, verify=settings.verify_checksums)
        }
        background = [lambda stop: rescue_loop(rt, stop)]
        if settings.kv_transfer == "direct":
            link = TransferLink(settings, settings.kv_buffer_mb)
            landing = KVLanding(link, settings.kv_reserve_timeout_s, settings.verify_checksums, rt.load)
            paths[KVPath.DIRECT] = DirectKVConnector(link, landing=landing)
            background.append(lambda stop: serve_kv_rooms(landing, rt.nc, rt.worker_id, stop))
        decode = DecodeStage(sv, ckpt, family, paths)
        mine = subjects.decode_for(rt.worker_id)
        own = Lane(decode, decoder_durable(rt.worker_id), mine, DIRECT_INACTIVE_S, label=subjects.DECODE)
        return Role([decode, own], store, background)
    if role == "pd":
        handoff = LocalDecode(Decoder(sv, ckpt, family))
        prefill = PrefillStage(sv, ckpt, family, ec_connector(rt.settings, store), handoff)
        return Role([prefill, text_lane(prefill)], store)
    raise ValueError(f"unknown role {role!r}; roles: encode, prefill, decode, pd, epd")
