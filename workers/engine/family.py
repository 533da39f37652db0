"""The engine's three operations, one adapter per model family.

`encode(images) -> embeddings`, `prefill(ids, embeddings) -> KV, logits`,
`decode(state, token) -> logits`. The project owns the KV between calls (one
tensor per request, movable between processes); transformers owns the layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image


class ImageRejected(ValueError):
    """The image processor refused an image (e.g. an extreme aspect ratio): the client's mistake, a 400."""


@dataclass
class Encoded:
    embedding: torch.Tensor  # (image_tokens, hidden)
    grid_thw: list[int]  # (t, h, w) patches before merging


@dataclass
class Prefilled:
    kv: torch.Tensor  # (layers, 2, kv_heads, prompt_tokens, head_dim)
    logits: torch.Tensor  # (vocab,) at the last prompt position
    rope_delta: int


@dataclass
class DecodeState:
    """A request's decode-side state: its KV cache and the next text position."""

    cache: Any
    position: int
    rope_delta: int


class Family(ABC):
    image_token_id: int

    @abstractmethod
    def image_tokens(self, grid_thw: list[int]) -> int:
        """How many placeholder tokens an image of this grid occupies in the prompt."""

    @abstractmethod
    def encode(self, images: list[Image.Image]) -> list[Encoded]: ...

    @abstractmethod
    def prefill(self, ids: list[int], images: list[Encoded]) -> Prefilled: ...

    @abstractmethod
    def start_decode(self, kv: torch.Tensor, rope_delta: int) -> DecodeState: ...

    @abstractmethod
    def decode(self, state: DecodeState, token: int) -> torch.Tensor:
        """Feed one token, return (vocab,) logits for the next; advances `state`."""
