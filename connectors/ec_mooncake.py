"""EC connector on Mooncake Store: any worker on any host loads what any encoder saved."""

from __future__ import annotations

import logging

import torch
from epd.connectors.ec import ECConnector, entry_room, unpack_entry, write_entry
from epd.connectors.mooncake_store import MooncakeStore
from epd.connectors.tensors import TensorIntegrityError
from epd.schemas.common import ImageEmbedding

KEY_PREFIX = "epd/ec/"

log = logging.getLogger(__name__)


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
        each embedding is copied once, from wherever it is (device memory too) into it, and checksummed there."""
        last = {key: (key, embedding, grid) for key, embedding, grid in entries}  # a key twice: its last entry
        unique = list(last.values())
        refs: dict[str, ImageEmbedding] = {}

        def write(slots: list[torch.Tensor]) -> list[torch.Tensor]:
            values = []
            for slot, (key, embedding, grid) in zip(slots, unique, strict=True):
                value, refs[key] = write_entry(slot, key, embedding, grid)
                values.append(value)
            return values

        rooms = [entry_room(key, embedding, grid) for key, embedding, grid in unique]
        await self._store.upsert_written([KEY_PREFIX + key for key, _, _ in unique], rooms, write)
        return [refs[key] for key, _, _ in entries]

    async def load_many(self, keys: list[str]) -> list[tuple[torch.Tensor, list[int]] | None]:
        """One batched read into the store's registered buffer."""
        values = await self._store.get_many([KEY_PREFIX + k for k in keys])
        return [None if v is None else self._unpack(k, v) for k, v in zip(keys, values, strict=True)]

    def _unpack(self, key: str, value: bytearray) -> tuple[torch.Tensor, list[int]] | None:
        """A damaged entry is a miss: the image is encoded again and the fresh entry overwrites this one
        (not removed here: a reader's lease may refuse the remove, and the upsert replaces it anyway)."""
        try:
            return unpack_entry(value, self.verify)
        except TensorIntegrityError as e:
            log.warning("encoder-cache entry %s is damaged (%s): a miss, encoded again", key, e)
            return None
