"""Encoder-cache (EC) connector: image embeddings under content keys, shared by all workers.

Invariants every backend keeps:
- `exists` is the scheduler-side query; it never loads bytes.
- `save` then `load` of a key returns the same tensor and grid, bit for bit.
- A missing, evicted or damaged key is a miss (`load` returns None), never an
  error; the caller re-encodes, and its save overwrites a damaged entry.
- `save_many` and `load_many` do what that many `save`s and `load`s do.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod

import msgspec
import numpy as np
import torch
from epd.connectors.tensors import (
    TensorIntegrityError,
    copy_to_host,
    dtype_name,
    from_bytes,
    handle_for,
    host_bytes,
)
from epd.schemas.common import ImageEmbedding, TensorHandle


class ECConnector(ABC):
    @abstractmethod
    async def exists(self, keys: list[str]) -> list[bool]:
        """Which of these keys are in the cache now."""

    @abstractmethod
    async def save(self, key: str, embedding: torch.Tensor, grid_thw: list[int]) -> ImageEmbedding:
        """Store an image's embedding (tokens, hidden); returns the handle messages carry."""

    @abstractmethod
    async def load(self, key: str) -> tuple[torch.Tensor, list[int]] | None:
        """The embedding and its grid, or None on a miss."""

    async def save_many(self, entries: list[tuple[str, torch.Tensor, list[int]]]) -> list[ImageEmbedding]:
        """Several `save`s (key, embedding, grid); a backend that can moves them in one batch."""
        return [await self.save(key, embedding, grid) for key, embedding, grid in entries]

    async def load_many(self, keys: list[str]) -> list[tuple[torch.Tensor, list[int]] | None]:
        """Several `load`s, in order; a backend that can moves them in one batch."""
        return [await self.load(key) for key in keys]


class _Meta(msgspec.Struct, array_like=True):
    tensor: TensorHandle
    grid_thw: list[int]


_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(_Meta)


def entry_parts(key: str, embedding: torch.Tensor, grid_thw: list[int]) -> tuple[bytes, torch.Tensor, ImageEmbedding]:
    """A self-describing value in two parts: (u32 header length + msgpack header), the raw tensor bytes.

    Self-describing so that a cache hit found by key alone (no encoder involved)
    still knows its shape and grid. The tensor part is the embedding's own memory (on the host).
    """
    flat = host_bytes(embedding)
    handle = handle_for(key, embedding, flat.numpy())
    header = _meta_encoder.encode(_Meta(tensor=handle, grid_thw=list(grid_thw)))
    return (
        struct.pack("<I", len(header)) + header,
        flat,
        ImageEmbedding(key=key, grid_thw=list(grid_thw), tensor=handle),
    )


_MAX_CHECKSUM = 2**64 - 1  # the header's longest encoding: a checksum needing all 8 bytes


def entry_room(key: str, embedding: torch.Tensor, grid_thw: list[int]) -> int:
    """Bytes `write_entry` needs for an entry: the tensor and the longest header it can have."""
    nbytes = embedding.numel() * embedding.element_size()
    longest = TensorHandle(key, list(embedding.shape), dtype_name(embedding.dtype), nbytes, _MAX_CHECKSUM)
    return 4 + len(_meta_encoder.encode(_Meta(tensor=longest, grid_thw=list(grid_thw)))) + nbytes


def write_entry(
    slot: torch.Tensor, key: str, embedding: torch.Tensor, grid_thw: list[int]
) -> tuple[torch.Tensor, ImageEmbedding]:
    """`entry_parts`' value written into `slot` (host uint8 of `entry_room` bytes) with one copy of the tensor,
    from whatever device it is on: the tensor goes to the slot's end, its checksum is taken there, and the header
    (whose length depends on the checksum) is written just before it. Returns the value (a suffix of `slot`)."""
    nbytes = embedding.numel() * embedding.element_size()
    flat = slot[slot.numel() - nbytes :]
    copy_to_host(flat, embedding)  # the one copy: device (or host) memory -> the slot
    handle = handle_for(key, embedding, flat.numpy())
    header = _meta_encoder.encode(_Meta(tensor=handle, grid_thw=list(grid_thw)))
    start = slot.numel() - nbytes - len(header) - 4
    value = slot[start:]
    value[: 4 + len(header)].numpy()[:] = np.frombuffer(struct.pack("<I", len(header)) + header, dtype=np.uint8)
    return value, ImageEmbedding(key=key, grid_thw=list(grid_thw), tensor=handle)


def unpack_entry(value: bytes, verify: bool = True) -> tuple[torch.Tensor, list[int]]:
    if len(value) < 4:
        raise TensorIntegrityError(f"encoder-cache value of {len(value)} bytes has no header")
    (n,) = struct.unpack_from("<I", value)
    try:
        meta = _meta_decoder.decode(value[4 : 4 + n])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise TensorIntegrityError(f"encoder-cache header is corrupt: {e}") from None
    return from_bytes(memoryview(value)[4 + n :], meta.tensor, verify), meta.grid_thw
