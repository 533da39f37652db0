"""KV connector on Mooncake Store: prefill puts one block per request, the decoder gets and removes it."""

from __future__ import annotations

import asyncio
import logging
import math

import torch
from epd.connectors.kv import KVConnector, KVTransferError, KVWriter
from epd.connectors.mooncake_store import MooncakeStore
from epd.connectors.tensors import from_bytes, handle_for, host_bytes
from epd.schemas.decode import KVHandle, KVPath

log = logging.getLogger(__name__)
KEY_PREFIX = "epd/kv/"


class StoreKVWriter(KVWriter):
    """Each layer into one host block as the forward computes it (the copy that gathering the KV after the forward
    would make); `finish` puts the block in the store."""

    path = KVPath.STORE
    decoder_id = None
    peer = ""

    def __init__(self, store: MooncakeStore, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._store, self.key, self.shape, self.dtype = store, key, shape, dtype
        self.nbytes = math.prod(shape) * dtype.itemsize
        self._block: torch.Tensor | None = None  # (layers, 2, kv_heads, tokens, head_dim) on the host
        self._copied: torch.cuda.Event | None = None  # the last device-to-host copy queued
        self._layers: set[int] = set()

    def write_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        on_device = keys.device.type == "cuda"
        if self._block is None:  # pinned for a device's KV: the copies then overlap the next layers' kernels
            self._block = torch.empty(self.shape, dtype=self.dtype, pin_memory=on_device)
        self._block[layer, 0].copy_(keys, non_blocking=on_device)
        self._block[layer, 1].copy_(values, non_blocking=on_device)
        if on_device:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._layers.add(layer)  # (a forward run again writes every layer again: the block is simply rewritten)

    async def finish(self) -> KVHandle:
        if self._block is None or len(self._layers) != self.shape[0]:
            await self.abort()
            raise KVTransferError(f"{len(self._layers)} of {self.shape[0]} layers were written")
        if self._copied is not None:
            await asyncio.to_thread(self._copied.synchronize)
        block, self._block = self._block, None
        flat = block.view(-1).view(torch.uint8)
        handle = handle_for(self.key, block, flat.numpy())
        await self._store.upsert(self.key, flat)  # copied once, into registered memory
        return KVHandle(path=KVPath.STORE, tensor=handle)

    async def abort(self) -> None:
        self._block = None


class MooncakeStoreKVConnector(KVConnector):
    def __init__(self, store: MooncakeStore, lease_wait_s: float = 0.25, verify: bool = True) -> None:
        """`verify`: check the checksum of what `recv` reads (`EPD_VERIFY_CHECKSUMS`)."""
        self._store, self.verify = store, verify
        self._lease_wait_s = lease_wait_s  # reads (and existence checks) pin a key for the lease TTL
        self._pending: set[asyncio.Task] = set()

    async def open(
        self, request_id: str, shape: tuple[int, ...], dtype: torch.dtype, decoder_id: str | None = None
    ) -> StoreKVWriter:
        return StoreKVWriter(self._store, KEY_PREFIX + request_id, shape, dtype)

    async def send(self, request_id: str, kv: torch.Tensor, decoder_id: str | None = None) -> KVHandle:
        """The whole KV, computed already: its bytes as they are (no host block of its own)."""
        flat = host_bytes(kv)
        handle = handle_for(KEY_PREFIX + request_id, kv, flat.numpy())
        await self._store.upsert(handle.key, flat)  # copied once, into registered memory
        return KVHandle(path=KVPath.STORE, tensor=handle)

    async def recv(self, handle: KVHandle) -> torch.Tensor:
        key = handle.tensor.key
        data = await self._store.get(key)
        if data is None:
            raise KVTransferError(f"KV block {key} is not in the store (owner gone or evicted)")
        return from_bytes(data, handle.tensor, self.verify)

    async def release(self, handle: KVHandle) -> None:
        task = asyncio.create_task(self._remove_after_lease(handle.tensor.key))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _remove_after_lease(self, key: str, attempts: int = 20) -> None:
        for _ in range(attempts):
            await asyncio.sleep(self._lease_wait_s)
            if await self._store.remove(key):
                return
        log.warning("KV block %s still in the store after %d removal attempts", key, attempts)
