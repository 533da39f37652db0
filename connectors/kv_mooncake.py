"""KV connector on Mooncake Store: prefill puts one block per request, the decoder gets and removes it."""

from __future__ import annotations

import asyncio
import logging

import torch
from epd.connectors.kv import KVConnector, KVTransferError
from epd.connectors.mooncake_store import MooncakeStore
from epd.connectors.tensors import from_bytes, handle_for, host_bytes
from epd.schemas.common import TensorHandle

log = logging.getLogger(__name__)
KEY_PREFIX = "epd/kv/"


class MooncakeStoreKVConnector(KVConnector):
    def __init__(self, store: MooncakeStore, lease_wait_s: float = 0.25, verify: bool = True) -> None:
        """`verify`: check the checksum of what `recv` reads (`EPD_VERIFY_CHECKSUMS`)."""
        self._store, self.verify = store, verify
        self._lease_wait_s = lease_wait_s  # reads (and existence checks) pin a key for the lease TTL
        self._pending: set[asyncio.Task] = set()

    async def send(self, request_id: str, kv: torch.Tensor) -> TensorHandle:
        flat = host_bytes(kv)
        handle = handle_for(KEY_PREFIX + request_id, kv, flat.numpy())
        await self._store.upsert(handle.key, flat)  # copied once, into registered memory
        return handle

    async def recv(self, handle: TensorHandle) -> torch.Tensor:
        data = await self._store.get(handle.key)
        if data is None:
            raise KVTransferError(f"KV block {handle.key} is not in the store (owner gone or evicted)")
        return from_bytes(data, handle, self.verify)

    async def release(self, handle: TensorHandle) -> None:
        task = asyncio.create_task(self._remove_after_lease(handle.key))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _remove_after_lease(self, key: str, attempts: int = 20) -> None:
        for _ in range(attempts):
            await asyncio.sleep(self._lease_wait_s)
            if await self._store.remove(key):
                return
        log.warning("KV block %s still in the store after %d removal attempts", key, attempts)
