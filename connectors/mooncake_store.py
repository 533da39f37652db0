"""A thin async face over the Mooncake Store client (blocking calls run in threads)."""

from __future__ import annotations

import asyncio
import os

from epd.ops.config import Settings

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

    async def remove(self, key: str) -> bool:
        """True once the key is gone (removed now or already missing); False while a lease pins it."""
        rc = await asyncio.to_thread(self._store.remove, key)
        return rc == 0 or rc in _MISSING

    def close(self) -> None:
        self._store.close()
