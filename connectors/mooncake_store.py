"""A thin async face over the Mooncake Store client (blocking calls run in threads)."""

from __future__ import annotations

import asyncio
import os

import torch
from epd.connectors.transfer_engine import Arena
from epd.ops.config import Settings

STAGING_MB = 64  # the registered buffer of batched reads and writes

# Mooncake Store return codes seen on misses: the key was never there, or was evicted.
_MISSING = (-704,)  # OBJECT_NOT_FOUND; -706 is a read lease still pinning the key


class StoreError(RuntimeError):
    pass


class MooncakeStore:
    """One client per process; it mounts `segment_mb` of this process's memory into the pool."""

    def __init__(self, settings: Settings, segment_mb: int | None = None) -> None:
        if not settings.mooncake_master or not settings.mooncake_metadata:
            raise ValueError("Mooncake Store needs --mooncake-master and --mooncake-metadata (or EPD_MOONCAKE_*)")
        # The transfer engine's sockets bind this address, not every interface.
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", settings.bind_host)
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        self._store = MooncakeDistributedStore()
        segment = (settings.mooncake_segment_mb if segment_mb is None else segment_mb) << 20
        rc = self._store.setup(
            settings.reachable_host,  # the address other clients read this segment at
            settings.mooncake_metadata,
            segment,
            16 << 20,  # local transfer buffer
            "tcp",
            "",
            settings.mooncake_master,
        )
        if rc != 0:
            raise StoreError(f"Mooncake Store setup failed (code {rc}) with master {settings.mooncake_master}")
        # Values go to this process's own segment first: a write never crosses the network, and never
        # lands in the segment of a peer that died before the master noticed.
        self._local = ReplicateConfig()
        if segment:
            self._local.preferred_segment = self._store.get_hostname()
        self._anywhere = ReplicateConfig()
        # batched reads and writes move through this registered buffer (no per-call registration)
        self._staging = torch.empty(STAGING_MB << 20, dtype=torch.uint8)
        self._staging_base = self._staging.data_ptr()
        if self._store.register_buffer(self._staging_base, STAGING_MB << 20) != 0:
            raise StoreError(f"cannot register a {STAGING_MB} MiB buffer with Mooncake Store")
        self._arena = Arena(STAGING_MB << 20)

    async def exists(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        codes = await asyncio.to_thread(self._store.batch_is_exist, keys)
        return [c == 1 for c in codes]

    async def upsert(self, key: str, data: bytes) -> None:
        """Write `key`, in this process's segment if it has room, else anywhere (retried once)."""
        for config in (self._local, self._anywhere, self._anywhere):
            rc = await asyncio.to_thread(self._store.upsert, key, data, config)
            if rc == 0:
                return
        raise StoreError(f"Mooncake upsert of {key} ({len(data)} bytes) failed with code {rc}")

    async def get(self, key: str) -> bytes | None:
        """The value, or None when the key is missing or was evicted."""
        data = await asyncio.to_thread(self._store.get, key)
        return data or None

    async def upsert_many(self, keys: list[str], values: list[list[bytes | torch.Tensor]]) -> None:
        """Write several keys in one batch, each value the concatenation of its parts.

        The parts are copied once, into a range of this client's registered buffer, and the store
        moves them from there (`batch_upsert_from`); keys the batch could not place are written one by one.
        """
        if len(set(keys)) < len(keys):  # a batch must not name one key twice: the last value wins
            last = dict(zip(keys, values, strict=True))
            keys, values = list(last), list(last.values())
        sizes = [sum(_nbytes(p) for p in parts) for parts in values]
        offset = self._arena.alloc(sum(sizes)) if keys else None
        if offset is None:  # larger than the buffer (or a busy one): one at a time
            for key, parts in zip(keys, values, strict=True):
                await self.upsert(key, b"".join(_as_bytes(p) for p in parts))
            return
        try:
            at, ptrs = offset, []
            for parts in values:
                ptrs.append(self._staging_base + at)
                for part in parts:
                    n = _nbytes(part)
                    self._staging[at : at + n].copy_(_as_uint8(part))
                    at += n
            rcs = await asyncio.to_thread(self._store.batch_upsert_from, keys, ptrs, sizes, self._local)
            for key, rc, ptr, size in zip(keys, rcs, ptrs, sizes, strict=True):
                if rc != 0:  # no room in this segment: anywhere, one by one
                    start = ptr - self._staging_base
                    await self.upsert(key, self._staging[start : start + size].numpy().tobytes())
        finally:
            self._arena.free(offset)

    async def get_many(self, keys: list[str]) -> list[bytearray | None]:
        """The values of several keys (None for a miss), read in one batch into the registered buffer.

        A key named twice is read once (a batch must not name one key twice)."""
        unique = list(dict.fromkeys(keys))
        values = dict(zip(unique, await asyncio.to_thread(self._get_many, unique), strict=True))
        return [values[k] for k in keys]

    def _get_many(self, keys: list[str]) -> list[bytearray | None]:
        sizes = [self._store.get_size(k) for k in keys]
        found = [i for i, n in enumerate(sizes) if n > 0]
        out: list[bytearray | None] = [None] * len(keys)
        offset = self._arena.alloc(sum(sizes[i] for i in found)) if found else None
        if offset is None:
            for i in found:
                out[i] = bytearray(self._store.get(keys[i])) or None
            return out
        try:
            ptrs, at = [], offset
            for i in found:
                ptrs.append(self._staging_base + at)
                at += sizes[i]
            rcs = self._store.batch_get_into([keys[i] for i in found], ptrs, [sizes[i] for i in found])
            for i, rc, ptr in zip(found, rcs, ptrs, strict=True):
                if rc == sizes[i]:
                    start = ptr - self._staging_base
                    out[i] = bytearray(self._staging[start : start + rc].numpy())
                elif rc >= 0:  # rewritten meanwhile with another size: read it alone
                    out[i] = bytearray(self._store.get(keys[i])) or None
        finally:
            self._arena.free(offset)
        return out

    async def remove(self, key: str) -> bool:
        """True once the key is gone (removed now or already missing); False while a lease pins it."""
        rc = await asyncio.to_thread(self._store.remove, key)
        return rc == 0 or rc in _MISSING

    def close(self) -> None:
        self._store.close()


def _nbytes(part: bytes | torch.Tensor) -> int:
    return part.numel() * part.element_size() if isinstance(part, torch.Tensor) else len(part)


def _as_uint8(part: bytes | torch.Tensor) -> torch.Tensor:
    if isinstance(part, torch.Tensor):
        return part.detach().contiguous().cpu().view(-1).view(torch.uint8)
    return torch.frombuffer(bytearray(part), dtype=torch.uint8) if part else torch.empty(0, dtype=torch.uint8)


def _as_bytes(part: bytes | torch.Tensor) -> bytes:
    return _as_uint8(part).numpy().tobytes() if isinstance(part, torch.Tensor) else part
