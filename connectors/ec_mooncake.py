"""EC connector on Mooncake Store: any worker on any host loads what any encoder saved."""

from __future__ import annotations

import torch
from epd.connectors.ec import ECConnector, entry_parts, unpack_entry
from epd.connectors.mooncake_store import MooncakeStore
from epd.schemas.common import ImageEmbedding

KEY_PREFIX = "epd/ec/"


class MooncakeECConnector(ECConnector):
    def __init__(self, store: MooncakeStore, verify: bool = True) -> None:
        self._store, self.verify = store, verify

    async def exists(self, keys: list[str]) -> list[bool]:
        return await self._store.exists([KEY_PREFIX + k for k in keys])

    async def save(self, key: str, embedding: torch.Tensor, grid_thw: list[int]) -> ImageEmbedding:
        return (await self.save_many([(key, embedding, grid_thw)]))[0]

    async def load(self, key: str) -> tuple[torch.Tensor, list[int]] | None:
        return (await self.load_many([key]))[0]

    async def save_many(self, entries: list[tuple[str, torch.Tensor, list[int]]]) -> list[ImageEmbedding]:
        """One batched upsert (not put: a stale value must not stay) from the store's registered buffer:
        each embedding is copied once, into it."""
        parts = [entry_parts(key, embedding, grid) for key, embedding, grid in entries]
        keys = [KEY_PREFIX + key for key, _, _ in entries]
        await self._store.upsert_many(keys, [[header, flat] for header, flat, _ in parts])
        return [ref for *_, ref in parts]

    async def load_many(self, keys: list[str]) -> list[tuple[torch.Tensor, list[int]] | None]:
        """One batched read into the store's registered buffer."""
        values = await self._store.get_many([KEY_PREFIX + k for k in keys])
        return [None if v is None else unpack_entry(v, self.verify) for v in values]
