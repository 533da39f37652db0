"""In-process EC connector for the aggregated `epd` topology: nothing leaves the process."""

from __future__ import annotations

from collections import OrderedDict

import torch
from epd.connectors.ec import ECConnector
from epd.schemas.common import ImageEmbedding


class InProcessECConnector(ECConnector):
    """An LRU of embeddings, at most `capacity_bytes` of them."""

    def __init__(self, capacity_bytes: int = 1 << 30) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, tuple[torch.Tensor, list[int]]] = OrderedDict()
        self._bytes = 0  # kept as entries come and go: a save does not sum the whole cache

    def usage_bytes(self) -> int:
        return self._bytes

    async def exists(self, keys: list[str]) -> list[bool]:
        return [k in self._entries for k in keys]

    async def save(self, key: str, embedding: torch.Tensor, grid_thw: list[int]) -> ImageEmbedding:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= _nbytes(old[0])
        self._entries[key] = (embedding, list(grid_thw))  # the most recent, at the end
        self._bytes += _nbytes(embedding)
        while self._bytes > self.capacity_bytes and len(self._entries) > 1:  # never the one just saved
            _, (evicted, _) = self._entries.popitem(last=False)
            self._bytes -= _nbytes(evicted)
        return ImageEmbedding(key=key, grid_thw=list(grid_thw))

    async def load(self, key: str) -> tuple[torch.Tensor, list[int]] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
