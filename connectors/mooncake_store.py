"""A thin async face over the Mooncake Store client (blocking calls run in threads)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from epd.connectors.tensors import host_bytes
from epd.connectors.transfer_engine import Arena
from epd.core.config import Settings, check_mooncake_env

STAGING_MB = 64  # the registered buffer that every read and write moves through

# Mooncake Store return codes seen on misses: the key was never there, or was evicted.
_MISSING = (-704,)  # OBJECT_NOT_FOUND; -706 is a read lease still pinning the key


class StoreError(RuntimeError):
    pass


class MooncakeStore:
    """One client per process; it mounts `segment_mb` of this process's memory into the pool."""

    def __init__(self, settings: Settings, segment_mb: int | None = None) -> None:
        if not settings.mooncake_master or not settings.mooncake_metadata:
            raise ValueError("Mooncake Store needs --mooncake-master and --mooncake-metadata (or EPD_MOONCAKE_*)")
        check_mooncake_env(settings)  # its transfer engine's sockets bind this process's address, not every interface
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
        # reads and writes move through this registered buffer (no per-call registration), touched now
        self._staging = torch.zeros(STAGING_MB << 20, dtype=torch.uint8)
        self._staging_base = self._staging.data_ptr()
        if self._store.register_buffer(self._staging_base, STAGING_MB << 20) != 0:
            raise StoreError(f"cannot register a {STAGING_MB} MiB buffer with Mooncake Store")
        self._arena = Arena(STAGING_MB << 20)
        self._touch_segment(segment)

    def _touch_segment(self, nbytes: int) -> None:
        """Write this process's segment through once, then free it.

        The client maps its segment lazily, and a put into pages never touched pays a page fault for
        each 4 KiB: 7 MiB took 4.0 ms against 1.0 ms warm on a 2-vCPU machine. This moves that cost
        from the first requests to start-up. Best effort: what does not fit is skipped.
        """
        if not nbytes:  # (a client that lends no memory: the gateway's)
            return
        chunk = STAGING_MB << 20
        keys = [f"epd/touch/{self._store.get_hostname()}/{i}" for i in range(-(-nbytes // chunk))]
        sizes = [min(chunk, nbytes - i * chunk) for i in range(len(keys))]
        self._store.batch_put_from(keys, [self._staging_base] * len(keys), sizes, self._local)
        self._store.batch_remove(keys)

    async def exists(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        codes = await asyncio.to_thread(self._store.batch_is_exist, keys)
        return [c == 1 for c in codes]

    async def upsert(self, key: str, data: bytes | torch.Tensor) -> None:
        """Write `key`, in this process's segment if it has room, else anywhere (retried once)."""
        await self.upsert_many([key], [[data]])

    async def get(self, key: str) -> bytearray | None:
        """The value, or None when the key is missing or was evicted."""
        return (await self.get_many([key]))[0]

    async def upsert_many(self, keys: list[str], values: list[list[bytes | torch.Tensor]]) -> None:
        """Write several keys in one batch, each value the concatenation of its parts.

        The parts are copied once, into registered memory, and the store moves them from there
        (`batch_upsert_from`). (The client's plain `put` and `upsert` join the parts, copy them into
        its 16 MiB transfer buffer, and refuse anything larger: a long prompt's KV.)
        """
        if len(set(keys)) < len(keys):  # a batch must not name one key twice: the last value wins
            last = dict(zip(keys, values, strict=True))
            keys, values = list(last), list(last.values())
        if keys:
            await asyncio.to_thread(self._upsert_many, keys, values)

    def _upsert_many(self, keys: list[str], values: list[list[bytes | torch.Tensor]]) -> None:
        def write(slots: list[torch.Tensor]) -> list[torch.Tensor]:
            for slot, parts in zip(slots, values, strict=True):
                at = 0
                for part in parts:
                    n = _nbytes(part)
                    _copy_into(slot[at : at + n], part)
                    at += n
            return slots

        self._upsert_written(keys, [sum(_nbytes(p) for p in parts) for parts in values], write)

    async def upsert_written(
        self, keys: list[str], rooms: list[int], write: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    ) -> None:
        """Write several keys whose values `write` puts straight into registered memory (no staging copy of
        the caller's own): it gets one host uint8 slot of `rooms[i]` bytes per key and returns each key's value,
        a slice of its slot. The keys must differ."""
        if len(set(keys)) < len(keys):
            raise ValueError("upsert_written: a key is named twice")
        if keys:
            await asyncio.to_thread(self._upsert_written, keys, rooms, write)

    def _upsert_written(
        self, keys: list[str], rooms: list[int], write: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    ) -> None:
        with self._room(sum(rooms)) as (room, base):
            slots, at = [], 0
            for n in rooms:
                slots.append(room[at : at + n])
                at += n
            values = write(slots)
            origin = room.data_ptr()
            ptrs = [base + (v.data_ptr() - origin) for v in values]
            sizes = [v.numel() for v in values]
            pending = list(range(len(keys)))
            for config in (self._local, self._anywhere, self._anywhere):  # this segment first, then anywhere
                rcs = self._store.batch_upsert_from(
                    [keys[i] for i in pending], [ptrs[i] for i in pending], [sizes[i] for i in pending], config
                )
                failed = [(i, rc) for i, rc in zip(pending, rcs, strict=True) if rc != 0]
                if not failed:
                    return
                pending = [i for i, _ in failed]
        i, rc = failed[0]
        raise StoreError(f"Mooncake upsert of {keys[i]} ({sizes[i]} bytes) failed with code {rc}")

    async def get_many(self, keys: list[str]) -> list[bytearray | None]:
        """The values of several keys (None for a miss), read in one batch into registered memory.

        A key named twice is read once (a batch must not name one key twice). (The client's plain `get`
        copies twice, through its transfer buffer, and refuses values over 16 MiB.)"""
        unique = list(dict.fromkeys(keys))
        values = dict(zip(unique, await asyncio.to_thread(self._get_many, unique), strict=True))
        return [values[k] for k in keys]

    def _get_many(self, keys: list[str]) -> list[bytearray | None]:
        sizes = [self._store.get_size(k) for k in keys]
        found = [i for i, n in enumerate(sizes) if n > 0]
        out: list[bytearray | None] = [None] * len(keys)
        if not found:
            return out
        with self._room(sum(sizes[i] for i in found)) as (room, base):
            offsets, at = [], 0
            for i in found:
                offsets.append(at)
                at += sizes[i]
            rcs = self._store.batch_get_into(
                [keys[i] for i in found], [base + o for o in offsets], [sizes[i] for i in found]
            )
            for i, rc, o in zip(found, rcs, offsets, strict=True):
                if rc == sizes[i]:  # else gone since, or rewritten with another size meanwhile: a miss
                    out[i] = bytearray(room[o : o + rc].numpy())
        return out

    @contextmanager
    def _room(self, nbytes: int) -> Iterator[tuple[torch.Tensor, int]]:
        """Registered memory for `nbytes`, and its address: a range of the staging buffer, or (when
        that has no such room) a buffer registered for this call alone."""
        offset = self._arena.alloc(nbytes)
        if offset is not None:
            try:
                yield self._staging[offset : offset + nbytes], self._staging_base + offset
            finally:
                self._arena.free(offset)
            return
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        if self._store.register_buffer(buf.data_ptr(), buf.numel()) != 0:
            raise StoreError(f"cannot register {nbytes} bytes with Mooncake Store")
        try:
            yield buf[:nbytes], buf.data_ptr()
        finally:
            self._store.unregister_buffer(buf.data_ptr())

    async def remove(self, key: str) -> bool:
        """True once the key is gone (removed now or already missing); False while a lease pins it."""
        rc = await asyncio.to_thread(self._store.remove, key)
        return rc == 0 or rc in _MISSING

    def close(self) -> None:
        self._store.close()


def _nbytes(part: bytes | torch.Tensor) -> int:
    return part.numel() * part.element_size() if isinstance(part, torch.Tensor) else len(part)


def _copy_into(room: torch.Tensor, part: bytes | torch.Tensor) -> None:
    if isinstance(part, torch.Tensor):
        room.copy_(host_bytes(part))
    elif part:
        room.numpy()[:] = np.frombuffer(part, dtype=np.uint8)
