"""The engine's three operations, one adapter per model family.

`encode(images) -> embeddings`, `prefill_batch([(ids, embeddings)]) -> [KV, logits]`,
`decode_step(tokens, positions, cache, step) -> logits`. The language model is the project's
own (`qwen2_text.py`), the same for every Qwen-VL family; the project owns the KV cache and the
batching (`kv_cache.py`, `workers/micro_batch.py`, `workers/decode_batch.py`). An adapter adds
what differs: the vision tower (`vision.py`, the project's own), and the prompt's 3-D positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import torch
from epd.workers.engine.context import Context, step_context
from epd.workers.engine.kv_cache import KVLayout, PagedKVCache, StepInputs
from epd.workers.engine.qwen2_text import Qwen2Text
from PIL import Image


class ImageRejected(ValueError):
    """The image processor refused an image (e.g. an extreme aspect ratio): the client's mistake, a 400."""


@dataclass
class Encoded:
    embedding: torch.Tensor  # (image_tokens, hidden)
    grid_thw: list[int]  # (t, h, w) patches before merging


@dataclass
class Prefilled:
    logits: torch.Tensor  # (vocab,) at the last prompt position
    rope_delta: int  # decode position p has M-RoPE position p + rope_delta
    kept: list[tuple[torch.Tensor, torch.Tensor]]  # the forward's per-layer (keys, values), (tokens, kv_heads, dim)
    start: int  # this prompt's tokens in the forward's flat batch
    end: int

    @cached_property
    def kv(self) -> torch.Tensor:
        """This prompt's KV as one tensor (layers, 2, kv_heads, prompt_tokens, head_dim), gathered when first asked:
        a direct transfer has sent it layer by layer already."""
        s, e = self.start, self.end
        return torch.stack([torch.stack([k[s:e], v[s:e]]) for k, v in self.kept]).transpose(2, 3).contiguous()


class LayerSink(Protocol):
    def write_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """One layer of one prompt's KV: keys and values (kv_heads, tokens, head_dim)."""


def _layer_router(sinks: list[LayerSink | None], bounds: list[int]) -> Callable:
    def on_layer(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        for sink, start, end in zip(sinks, bounds, bounds[1:], strict=False):
            if sink is not None:
                sink.write_layer(layer, keys[start:end].transpose(0, 1), values[start:end].transpose(0, 1))

    return on_layer


class Family(ABC):
    model: Any  # transformers' *ForConditionalGeneration skeleton: its M-RoPE position code (a given one: baseline)
    text: Qwen2Text | None  # the language model (`None` when not loaded)
    image_token_id: int
    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def image_tokens(self, grid_thw: list[int]) -> int:
        """How many placeholder tokens an image of this grid occupies in the prompt."""

    @abstractmethod
    def prepare(self, images: list[Image.Image | np.ndarray]) -> tuple[torch.Tensor, list[list[int]]]:
        """Images preprocessed for the tower: pixel_values on the device and each image's grid (t, h, w).
        ImageRejected for an image the image processor refuses."""

    @abstractmethod
    def encode_prepared(self, pixels: torch.Tensor, grids: list[list[int]]) -> list[Encoded]:
        """`prepare`'s output through the vision tower in one forward, packed as the tower expects."""

    def encode(self, images: list[Image.Image | np.ndarray]) -> list[Encoded]:
        """Every image through the vision tower in one forward: `prepare`, then `encode_prepared`."""
        return self.encode_prepared(*self.prepare(images))

    @abstractmethod
    def positions(self, ids: torch.Tensor, images: list[Encoded]) -> tuple[torch.Tensor, int]:
        """A prompt's (3, tokens) M-RoPE positions and its rope delta."""

    def kv_layout(self) -> KVLayout:
        cfg = self.text.config
        return KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, self.text.head_dim, self.dtype, self.device)

    def prefill(self, ids: list[int], images: list[Encoded]) -> Prefilled:
        return self.prefill_batch([(ids, images)])[0]

    @torch.inference_mode()
    def prefill_batch(
        self, prompts: list[tuple[list[int], list[Encoded]]], sinks: list[LayerSink | None] | None = None
    ) -> list[Prefilled]:
        """Several prompts in one forward over their tokens back to back, each attending to its own.

        `sinks[i]`, if any, receives prompt i's KV of each layer as soon as that layer has computed it.
        """
        lengths = [len(ids) for ids, _ in prompts]
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        embeds, positions, deltas = [], [], []
        for ids, images in prompts:
            input_ids = torch.tensor(ids, device=self.device)
            embeds.append(self._embed(input_ids, images))
            pos, delta = self.positions(input_ids, images)
            positions.append(pos)
            deltas.append(delta)
        ctx = Context(
            prefill=True,
            cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=self.device),
            max_seqlen=max(lengths),
            on_layer=_layer_router(sinks, bounds) if sinks and any(sinks) else None,
        )
        with step_context(ctx):
            hidden = self.text(torch.cat(embeds), torch.cat(positions, dim=1))  # (tokens, hidden)
        logits = self.text.logits(hidden[torch.tensor(bounds[1:], device=self.device) - 1])
        return [Prefilled(logits[i], deltas[i], ctx.kept, bounds[i], bounds[i + 1]) for i in range(len(prompts))]

    @torch.inference_mode()
    def decode_step(
        self,
        tokens: list[int] | torch.Tensor,
        positions: list[int] | torch.Tensor,
        cache: PagedKVCache,
        step: StepInputs,
    ) -> torch.Tensor:
        """One token for each sequence of the batch (`positions`: M-RoPE ones); (batch, vocab) float32 logits.

        Given device tensors (as `cuda_graphs.py` does) it launches device work only, so it can be captured.
        """
        ids = torch.as_tensor(tokens, device=self.device).view(-1)
        pos = torch.as_tensor(positions, device=self.device).view(1, -1).expand(3, -1)  # text: t = h = w
        ctx = Context(
            prefill=False,
            slot_mapping=step.slots,
            block_tables=step.tables,
            seq_lens=step.seq_lens,
            k_cache=cache.k,
            v_cache=cache.v,
        )
        with step_context(ctx):
            hidden = self.text(self.text.embed_tokens(ids), pos)
        return self.text.logits(hidden)

    def _embed(self, ids: torch.Tensor, images: list[Encoded]) -> torch.Tensor:
        """Token embeddings with the images' features in place of their placeholder tokens."""
        embeds = self.text.embed_tokens(ids)
        if images:
            slots = ids == self.image_token_id
            features = torch.cat([im.embedding.to(self.device, self.dtype) for im in images])
            if int(slots.sum()) != features.shape[0]:
                raise ValueError(f"the prompt has {int(slots.sum())} image tokens for {features.shape[0]} features")
            embeds = embeds.clone()
            embeds[slots] = features
        return embeds
