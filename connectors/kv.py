"""KV connector: moves a prefilled prompt's KV cache from a prefill worker to a decoder.

The KV of a request is one tensor (layers, 2, kv_heads, tokens, head_dim).
Invariants: `recv(send(kv))` equals `kv` bit for bit or raises; `release` frees
what `send` holds, and is safe to call more than once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from epd.schemas.common import TensorHandle


class KVTransferError(RuntimeError):
    pass


class KVConnector(ABC):
    @abstractmethod
    async def send(self, request_id: str, kv: torch.Tensor) -> TensorHandle:
        """Make `kv` loadable by a decoder; returns the handle the KV-ready event carries."""

    @abstractmethod
    async def recv(self, handle: TensorHandle) -> torch.Tensor:
        """Load the KV a handle names; raises KVTransferError if it is gone."""

    @abstractmethod
    async def release(self, handle: TensorHandle) -> None:
        """Free the KV's storage once it is loaded (or abandoned)."""
