"""Direct P→D KV transfer on the Mooncake TransferEngine, layer by layer.

1. Before its forward, prefill asks the decoder it picked for room (`KVReserve`, NATS
   request-reply). The decoder takes a range of its registered buffer and answers with
   the range's address (`KVGrant`).
2. As the forward computes each layer's keys and values, prefill copies them into a range
   of its own buffer and starts a one-sided write of that layer into the decoder's range:
   the transfer runs while the next layers compute.
3. After the forward, prefill waits for the writes and publishes `KVReady` with a handle of path
   DIRECT naming the grant, and the checksum of what it wrote.
4. The decoder checks size, shape, dtype (and checksum) and copies the KV out of the range.

A grant is freed when its KV is loaded, when prefill releases it (the request ended at its
first token, or the writes failed), or `EPD_KV_RESERVE_TIMEOUT_S` after it was made.
Whatever goes wrong before `KVReady`, prefill falls back to the store path
(`kv_mooncake.py`), which any decoder can load.

The reservations travel over the worker's messaging (`KVRooms`, passed in; NATS in workers/kv_rooms.py):
this module moves bytes only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

import torch
from epd.connectors.kv import KVConnector, KVTransferError, KVWriter
from epd.connectors.tensors import dtype_name, from_bytes, new_digest
from epd.connectors.transfer_engine import TransferError, TransferLink
from epd.schemas.common import TensorHandle
from epd.schemas.decode import KVGrant, KVHandle, KVPath, KVRelease, KVReserve

if TYPE_CHECKING:
    from epd.core.runtime import Load

log = logging.getLogger(__name__)

RESERVE_TIMEOUT_S = 1.0  # how long prefill waits for a decoder's grant before taking the store path
GRANT_MARGIN_S = 1.0  # prefill neither writes nor publishes KV into a grant this close to its expiry
DRAIN_S = 10.0  # how long prefill waits for its writes to land
# A request granted room again (its prefill worker died and JetStream redelivered the job to another) has
# its earlier grant freed this soon: not at once, since the dead worker may have published its KV-ready
# message just before it died, and this decoder may still be about to load it.
REGRANT_GRACE_S = 5.0


class KVRooms(Protocol):
    """Prefill's client for decoders' KV room (request-reply to one decoder)."""

    async def reserve(self, decoder_id: str, request: KVReserve, timeout_s: float) -> KVGrant | None:
        """The decoder's answer; None when it gave none within `timeout_s` (gone, or unreachable)."""

    async def release(self, decoder_id: str, grant_id: str) -> None:
        """Fire and forget: the granted room will not be written (else it expires on its own)."""


class KVLanding:
    """A decoder's side: grants ranges of its registered buffer and hands out the KV written into them."""

    def __init__(self, link: TransferLink, ttl_s: float, verify: bool = True, load: Load | None = None) -> None:
        """`load`: the worker's heartbeat figures, kept up to date with the grants."""
        self.link, self.ttl_s, self.verify, self.load = link, ttl_s, verify, load
        self._grants: dict[str, tuple[int, int, float]] = {}  # grant id -> (offset, nbytes, expires at)
        self._by_request: dict[str, str] = {}  # request id -> its latest grant id
        self._lock = threading.Lock()

    @property
    def granted_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n, _ in self._grants.values())

    def reserve(self, request: KVReserve) -> KVGrant:
        self.expire()
        offset = self.link.arena.alloc(request.nbytes) if request.nbytes > 0 else None
        if offset is None:
            return KVGrant(granted=False, reason=f"no room for {request.nbytes} bytes (EPD_KV_BUFFER_MB)")
        grant_id = uuid.uuid4().hex
        now = time.monotonic()
        with self._lock:
            self._grants[grant_id] = (offset, request.nbytes, now + self.ttl_s)
            earlier = self._by_request.get(request.request_id)
            self._by_request[request.request_id] = grant_id
            if earlier in self._grants:  # its first prefill worker died: that grant goes soon, not at its TTL
                at, nbytes, expires = self._grants[earlier]
                self._grants[earlier] = (at, nbytes, min(expires, now + REGRANT_GRACE_S))
        if self.load is not None:
            self.load.kv_grants += 1
        self._account()
        return KVGrant(
            granted=True,
            grant_id=grant_id,
            session=self.link.session,
            address=self.link.base + offset,
            ttl_s=self.ttl_s,
        )

    def release(self, grant_id: str) -> None:
        with self._lock:
            grant = self._grants.pop(grant_id, None)
            self._by_request = {r: g for r, g in self._by_request.items() if g != grant_id}
        if grant is not None:
            self.link.arena.free(grant[0])
            self._account()

    def _account(self) -> None:
        if self.load is not None:
            self.load.kv_granted_bytes = self.granted_bytes

    def expire(self) -> int:
        """Free the grants past their time; returns how many."""
        now = time.monotonic()
        with self._lock:
            gone = [g for g, (_, _, expires) in self._grants.items() if expires <= now]
        for g in gone:
            log.warning("KV grant %s expired unused: freed", g)
            self.release(g)
        return len(gone)

    def answer(self, message: KVReserve | KVRelease) -> KVGrant | None:
        """A reservation's grant (or refusal); a release frees its grant and has no answer."""
        if isinstance(message, KVRelease):
            self.release(message.grant_id)
            return None
        return self.reserve(message)

    def take(self, handle: TensorHandle) -> torch.Tensor:
        """The KV written into a grant (`handle.key` is its id), as a tensor of its own; the grant is freed."""
        grant_id = handle.key
        with self._lock:
            grant = self._grants.get(grant_id)
        if grant is None:
            raise KVTransferError(f"KV grant {grant_id} is not held by this decoder (expired, or another's)")
        offset, nbytes, _ = grant
        try:
            return from_bytes(self.link.view(offset, min(nbytes, handle.nbytes)).numpy(), handle, self.verify)
        finally:
            self.release(grant_id)


class LayerWriter(KVWriter):
    """Prefill's side of one grant: each layer's KV is staged and written as soon as it is computed."""

    path = KVPath.DIRECT

    def __init__(
        self,
        link: TransferLink,
        rooms: KVRooms | None,
        decoder_id: str,
        grant: KVGrant,
        offset: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        """`rooms` None: nobody to tell of an abort (a benchmark's writer; the grant expires)."""
        self.link, self.rooms, self.decoder_id, self.grant = link, rooms, decoder_id, grant
        self.peer = grant.session  # the decoder's host:port: the KV goes there directly
        self.offset, self.shape, self.dtype = offset, shape, dtype
        self.nbytes = math.prod(shape) * dtype.itemsize
        self.layer_bytes = self.nbytes // shape[0]
        self.staging = link.view(offset, self.nbytes).view(dtype).view(shape)
        self.expires_at = time.monotonic() + grant.ttl_s
        self.batches: list[int] = []
        self.pending: list[Future] = []  # device tensors: writes the sender thread starts
        self.layers_written = 0
        self._digest = new_digest()  # of the KV's bytes, fed as each layer is sent
        self.error: Exception | None = None
        self._closed = False

    def write_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """(In the forward's thread.) Stage layer `layer` (keys, values: (kv_heads, tokens, head_dim)) and send it."""
        if self.error is not None:
            return
        if time.monotonic() > self.expires_at - GRANT_MARGIN_S:  # the room may go to another request soon
            self.error = TransferError("the decoder's grant expires before the KV is written")
            return
        if layer != self.layers_written:  # a forward ran again (a failed batch, retried item by item)
            self.error = TransferError(f"layer {layer} came after {self.layers_written} layers: sent again")
            return
        try:
            on_device = keys.device.type != "cpu"
            self.staging[layer, 0].copy_(keys, non_blocking=on_device)
            self.staging[layer, 1].copy_(values, non_blocking=on_device)
            if on_device:  # the copies are queued behind this layer's kernels: send once they are done,
                copied = torch.cuda.Event()  # from the link's sender thread, while the next layers run
                copied.record()
                self.pending.append(self.link.sender.submit(self._send, layer, copied))
            else:
                self._send(layer)
            self.layers_written += 1
        except (TransferError, RuntimeError) as e:  # the request takes the store path; the batch computes on
            self.error = e

    def _send(self, layer: int, copied: torch.cuda.Event | None = None) -> None:
        if copied is not None:
            copied.synchronize()
        at = layer * self.layer_bytes
        self.batches.append(
            self.link.write(self.grant.session, self.offset + at, self.grant.address + at, self.layer_bytes)
        )
        # the checksum runs along, layer by layer in order (layers come in order, and one thread sends
        # a device tensor's), instead of over the whole KV after the forward
        self._digest.update(self.link.view(self.offset + at, self.layer_bytes).numpy())

    async def finish(self) -> KVHandle:
        """Wait for every layer's write; the handle `KVReady` carries. Raises TransferError (the grant freed)."""
        try:
            if self.error is not None:
                raise TransferError(f"a layer could not be sent: {self.error}")
            if self.layers_written != self.shape[0]:
                raise TransferError(f"{self.layers_written} of {self.shape[0]} layers were sent")
            await self._sent()
            await self.link.wait_async(self.batches, timeout_s=DRAIN_S)
            if time.monotonic() > self.expires_at - GRANT_MARGIN_S:
                raise TransferError("the decoder's grant expires before it could load the KV")
            digest = self._digest.intdigest()
        except TransferError:
            await self.abort()
            raise
        self._free_staging()
        tensor = TensorHandle(
            key=self.grant.grant_id,
            shape=list(self.shape),
            dtype=dtype_name(self.dtype),
            nbytes=self.nbytes,
            checksum=digest,
        )
        return KVHandle(path=KVPath.DIRECT, tensor=tensor)

    async def abort(self) -> None:
        """The KV will not be published: the decoder frees its room, this worker its staging."""
        if self._closed:
            return
        try:  # writes in flight still read the staging range: let them end first
            await self._sent()
            await self.link.wait_async(self.batches, timeout_s=DRAIN_S)
        except TransferError:
            pass
        if self.batches:  # still running: the range stays taken rather than be overwritten under them
            log.error(
                "%d KV writes to %s never ended: %d staging bytes kept", len(self.batches), self.decoder_id, self.nbytes
            )
            self._closed = True
        self._free_staging()
        if self.rooms is not None:
            await self.rooms.release(self.decoder_id, self.grant.grant_id)

    async def _sent(self) -> None:
        """Every write the sender thread was given has started (device tensors only)."""
        pending, self.pending = self.pending, []
        # all of them, even past a failed one: none may still touch the staging range afterwards
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in pending), return_exceptions=True)
        for e in results:
            if isinstance(e, BaseException):
                raise TransferError(f"a layer could not be sent: {e}") from None

    def _free_staging(self) -> None:
        if not self._closed:
            self._closed = True
            self.link.arena.free(self.offset)


class DirectKVConnector(KVConnector):
    """The direct path. Prefill's side (`rooms`) opens writers into a decoder's granted room; a decoder's side
    (`landing`) loads what was written into its grants."""

    def __init__(self, link: TransferLink, rooms: KVRooms | None = None, landing: KVLanding | None = None) -> None:
        self.link, self.rooms, self.landing = link, rooms, landing

    async def open(
        self, request_id: str, shape: tuple[int, ...], dtype: torch.dtype, decoder_id: str | None = None
    ) -> LayerWriter | None:
        """A writer into `decoder_id`'s memory for KV of `shape`; None (take the store path) if there is no room."""
        if self.rooms is None or decoder_id is None:
            raise ValueError("a direct KV writer needs the decoders' rooms and a decoder")
        nbytes = math.prod(shape) * dtype.itemsize
        offset = self.link.arena.alloc(nbytes)
        if offset is None:
            log.info("no staging room for %d bytes of KV (EPD_KV_BUFFER_MB): store path", nbytes)
            return None
        request = KVReserve(request_id=request_id, nbytes=nbytes)
        grant = await self.rooms.reserve(decoder_id, request, RESERVE_TIMEOUT_S)
        if grant is None or not grant.granted:
            self.link.arena.free(offset)
            log.info("decoder %s gave no KV room (%s): store path", decoder_id, grant.reason if grant else "no answer")
            return None
        return LayerWriter(self.link, self.rooms, decoder_id, grant, offset, shape, dtype)

    async def recv(self, handle: KVHandle) -> torch.Tensor:
        if self.landing is None:
            raise ValueError("only a decoder's direct connector loads KV")
        return await asyncio.to_thread(self.landing.take, handle.tensor)

    async def release(self, handle: KVHandle) -> None:
        if self.landing is not None:
            self.landing.release(handle.tensor.key)
