"""KV connector: moves a prefilled prompt's KV cache from a prefill worker to a decoder.

The KV of a request is one tensor (layers, 2, kv_heads, tokens, head_dim). Prefill `open`s a writer before its
forward; the forward hands it each layer as it is computed (`write_layer`, in the forward's thread); `finish`
returns the handle `KVReady` carries, or `abort` gives up what the writer holds. Two implementations:
the store path (`kv_mooncake.py`: any decoder loads it) and the direct path (`kv_direct.py`: written into one
decoder's memory, layer by layer, while the forward runs). A handle's `path` says which connector loads it.

Invariants: `recv` of a finished writer's handle equals what was written, bit for bit, or raises
KVTransferError; `release` frees what the handle holds, and is safe to call more than once; after `abort`,
the writer holds nothing, here or at the decoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from epd.schemas.decode import KVHandle, KVPath


class KVTransferError(RuntimeError):
    pass


class KVWriter(ABC):
    path: KVPath
    decoder_id: str | None  # the decoder that must load it (direct), or None: any decoder can
    peer: str  # where the bytes go, for spans: the decoder's TransferEngine (host:port), or "" (the store)
    shape: tuple[int, ...]
    nbytes: int

    @abstractmethod
    def write_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """(In the forward's thread.) Layer `layer`'s keys and values, (kv_heads, tokens, head_dim) each; layers
        come in order. A failure is kept and raised by `finish`: the forward computes on."""

    @abstractmethod
    async def finish(self) -> KVHandle:
        """Every layer is where the decoder loads it: its handle. Raises KVTransferError (having aborted)."""

    @abstractmethod
    async def abort(self) -> None:
        """The KV will not be published: free what this writer holds, here and at the decoder."""


class KVConnector(ABC):
    @abstractmethod
    async def open(
        self, request_id: str, shape: tuple[int, ...], dtype: torch.dtype, decoder_id: str | None = None
    ) -> KVWriter | None:
        """A writer for one request's KV of `shape`, to `decoder_id` where the path needs one; None when this path
        cannot take it now (no room, no grant): the caller takes another."""

    @abstractmethod
    async def recv(self, handle: KVHandle) -> torch.Tensor:
        """Load the KV a handle names; raises KVTransferError if it is gone."""

    @abstractmethod
    async def release(self, handle: KVHandle) -> None:
        """Free the KV's storage once it is loaded (or abandoned)."""

    async def send(self, request_id: str, kv: torch.Tensor, decoder_id: str | None = None) -> KVHandle:
        """The whole KV at once (already computed): open, every layer, finish."""
        writer = await self.open(request_id, tuple(kv.shape), kv.dtype, decoder_id)
        if writer is None:
            raise KVTransferError(f"no room for {kv.numel() * kv.element_size()} bytes of KV")
        for layer in range(kv.shape[0]):
            writer.write_layer(layer, kv[layer, 0], kv[layer, 1])
        return await writer.finish()
