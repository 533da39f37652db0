"""Roles: which stages a worker process runs, and with which connectors.

| role    | consumes        | encoder cache | KV                 |
|---------|-----------------|---------------|--------------------|
| encode  | encode          | Mooncake      | -                  |
| prefill | prefill         | Mooncake      | sends (Mooncake)   |
| decode  | decode          | -             | receives (Mooncake)|
| pd      | prefill         | Mooncake      | stays in process   |
| epd     | prefill         | in process    | stays in process   |
"""

from __future__ import annotations

from epd.connectors.ec_memory import InProcessECConnector
from epd.connectors.ec_mooncake import MooncakeECConnector
from epd.connectors.kv_mooncake import MooncakeStoreKVConnector
from epd.connectors.mooncake_store import MooncakeStore
from epd.workers.decode import Decoder, DecodeStage
from epd.workers.encode import EncodeStage
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.family import Family
from epd.workers.loop import Stage
from epd.workers.prefill import PrefillStage, local_decode, remote_decode
from epd.workers.runtime import Runtime


def build_stages(role: str, rt: Runtime, ckpt: Checkpoint, family: Family) -> tuple[list[Stage], MooncakeStore | None]:
    """The stages of a role, and the store client to close at exit (None for `epd`)."""
    if role == "epd":
        decoder = Decoder(rt, ckpt, family)
        ec = InProcessECConnector()
        return [PrefillStage(rt, ckpt, family, ec, local_decode(decoder, family), inline_encode=True)], None
    store = MooncakeStore(rt.settings)
    if role == "encode":
        return [EncodeStage(rt, family, MooncakeECConnector(store))], store
    if role == "prefill":
        handoff = remote_decode(rt, MooncakeStoreKVConnector(store))
        return [PrefillStage(rt, ckpt, family, MooncakeECConnector(store), handoff)], store
    if role == "decode":
        return [DecodeStage(rt, ckpt, family, MooncakeStoreKVConnector(store))], store
    if role == "pd":
        handoff = local_decode(Decoder(rt, ckpt, family), family)
        return [PrefillStage(rt, ckpt, family, MooncakeECConnector(store), handoff)], store
    raise ValueError(f"unknown role {role!r}; roles: encode, prefill, decode, pd, epd")
