"""One Mooncake TransferEngine per process, and the registered buffer it moves bytes from and into.

A decoder lends ranges of its buffer to prefill workers (landing room for a request's KV);
a prefill worker stages each layer's KV in ranges of its own and writes them one-sided into
the decoder's range. The engine refuses a write outside the target's registered memory.

The buffer is allocated once and registered once: registering per request would cost a
metadata round trip each time. It is host memory (pinned where CUDA is present), which is
what the TCP transport reads and writes; an RDMA transport could register device memory
instead, so GPU tensors would move without a host copy (not built: no RDMA here to test it).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from epd.connectors.kv import KVTransferError
from epd.core.config import Settings, check_mooncake_env

ALIGN = 4096  # ranges start on page boundaries
NAME_ATTEMPTS = 8


class TransferError(KVTransferError):
    pass


class Arena:
    """First-fit ranges of one buffer, merged again on free; thread-safe (prefill allocates in its forward thread)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._used.values())

    def alloc(self, nbytes: int) -> int | None:
        """The offset of `nbytes` of free room, or None if no free range is that large."""
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:
            for i, (off, length) in enumerate(self._free):
                if length >= need:
                    self._free[i : i + 1] = [(off + need, length - need)] if length > need else []
                    self._used[off] = need
                    return off
        return None

    def free(self, offset: int) -> None:
        with self._lock:
            length = self._used.pop(offset, None)
            if length is None:
                return  # freed twice: the second is a no-op
            ranges = sorted([*self._free, (offset, length)])
            merged: list[tuple[int, int]] = []
            for off, n in ranges:
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((off, n))
            self._free = merged


class TransferLink:
    """This process's TransferEngine and its registered buffer of `buffer_mb`."""

    def __init__(self, settings: Settings, buffer_mb: float) -> None:
        if not settings.mooncake_metadata:
            raise ValueError("the direct KV transfer needs --mooncake-metadata (or EPD_MOONCAKE_METADATA)")
        check_mooncake_env(settings)  # the address it binds and advertises
        from mooncake.engine import TransferEngine

        # "host:port" names this engine's segment in the metadata server; the engine listens on a port
        # of its own choosing. The name's port is held bound (never listening) while this process lives,
        # so no other engine on this host takes the same name; a name a dead process left registered is
        # refused ("duplicate"), and the next free port is tried.
        for _ in range(NAME_ATTEMPTS):
            self._name = socket.socket()
            self._name.bind((settings.bind_host, 0))
            self.session = f"{settings.reachable_host}:{self._name.getsockname()[1]}"
            self.engine = TransferEngine()
            rc = self.engine.initialize(self.session, settings.mooncake_metadata, "tcp", "")
            if rc == 0:
                break
            self._name.close()
        else:
            raise TransferError(f"TransferEngine setup failed (code {rc}) with metadata {settings.mooncake_metadata}")
        size = int(buffer_mb * 2**20)
        # host memory: over TCP, device tensors stage through it (pinned, so the copies are DMA)
        self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        self.base = self.buffer.data_ptr()
        if self.engine.register_memory(self.base, size) != 0:
            raise TransferError(f"cannot register {buffer_mb} MiB with the TransferEngine")
        self.arena = Arena(size)
        self.sender = ThreadPoolExecutor(1, thread_name_prefix="kv-send")  # writes of device tensors, in order

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.buffer[offset : offset + nbytes]

    def write(self, target: str, offset: int, remote_address: int, nbytes: int) -> int:
        """Start writing `nbytes` at `offset` of this buffer to `remote_address` of `target`; a batch id."""
        batch = self.engine.batch_transfer_async_write(target, [self.base + offset], [remote_address], [nbytes])
        if batch in (0, 2**64 - 1):
            raise TransferError(f"cannot start a write of {nbytes} bytes to {target}")
        return batch

    def wait(self, batches: list[int], timeout_s: float) -> None:
        """Sleep until every write has landed; raises TransferError on a failed one or past the timeout.

        Ended batches are removed from `batches` (the engine frees their ids: never ask about one again).
        Each batch holds one write; the engine's own batch wait spins a core, which a prefill worker
        needs for its next layers."""
        deadline, pause = time.monotonic() + timeout_s, 2e-5
        while batches:
            codes = [self.engine.transfer_check_status(b) for b in batches]
            batches[:] = [b for b, c in zip(batches, codes, strict=True) if c not in (1, -1)]
            if -1 in codes:
                raise TransferError(f"{codes.count(-1)} KV writes failed")
            if batches and time.monotonic() > deadline:
                raise TransferError(f"{len(batches)} KV writes still running after {timeout_s:.1f} s")
            if batches:
                time.sleep(pause)
                pause = min(pause * 2, 2e-4)

    async def wait_async(self, batches: list[int], timeout_s: float) -> None:
        await asyncio.to_thread(self.wait, batches, timeout_s)
