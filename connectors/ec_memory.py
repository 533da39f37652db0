"""In-process EC connector for the aggregated `epd` topology: nothing leaves the process."""

from __future__ import annotations

from collections import OrderedDict

import torch
from epd.connectors.ec import ECConnector
from epd.schemas.common import ImageEmbedding


class InProcessECConnector(ECConnector):
    """An LRU of at most `capacity` embeddings."""

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[torch.Tensor, list[int]]] = OrderedDict()

    async def exists(self, keys: list[str]) -> list[bool]:
        return [k in self._entries for k in keys]

    async def save(self, key: str, embedding: torch.Tensor, grid_thw: list[int]) -> ImageEmbedding:
        self._entries[key] = (embedding, list(grid_thw))
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return ImageEmbedding(key=key, grid_thw=list(grid_thw))

    async def load(self, key: str) -> tuple[torch.Tensor, list[int]] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry
