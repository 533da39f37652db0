"""EC connector on Mooncake Store: any worker on any host loads what any encoder saved."""

from __future__ import annotations

import torch
from epd.connectors.ec import ECConnector, pack_entry, unpack_entry
from epd.connectors.mooncake_store import MooncakeStore
from epd.schemas.common import ImageEmbedding

KEY_PREFIX = "epd/ec/"


class MooncakeECConnector(ECConnector):
    def __init__(self, store: MooncakeStore, verify: bool = True) -> None:
        self._store, self.verify = store, verify

    async def exists(self, keys: list[str]) -> list[bool]:
        return await self._store.exists([KEY_PREFIX + k for k in keys])

    async def save(self, key: str, embedding: torch.Tensor, grid_thw: list[int]) -> ImageEmbedding:
        value, ref = pack_entry(key, embedding, grid_thw)
        await self._store.upsert(KEY_PREFIX + key, value)  # put would keep a stale value
        return ref

    async def load(self, key: str) -> tuple[torch.Tensor, list[int]] | None:
        value = await self._store.get(KEY_PREFIX + key)
        return None if value is None else unpack_entry(value, self.verify)
