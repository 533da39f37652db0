"""The engine's three operations, one adapter per model family.

`encode(images) -> embeddings`, `prefill_batch([(ids, embeddings)]) -> [KV, logits]`,
`decode_step(tokens, positions, view) -> logits`. The project owns the KV cache and
the batching (`kv_cache.py`, `workers/micro_batch.py`, `workers/decode_batch.py`);
transformers owns the layers.

The language-model half is the same for every Qwen-VL family: their text models take
the same inputs (embeddings with image features in place of the image tokens, M-RoPE
positions, a 4-D mask, a cache object that answers `update`). So `Family` runs it, and
an adapter adds what differs: the vision tower, and the prompt's 3-D positions.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, Protocol

import torch
from epd.workers.engine.kv_cache import KVLayout, PrefillView, StepView
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
    view: PrefillView  # the forward's KV, every row of the batch
    row: int
    tokens: int

    @cached_property
    def kv(self) -> torch.Tensor:
        """This prompt's KV as one tensor (layers, 2, kv_heads, prompt_tokens, head_dim), gathered when first asked:
        a direct transfer has sent it layer by layer already."""
        return self.view.row(self.row, self.tokens)


class LayerSink(Protocol):
    def write_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """One layer of one prompt's KV: keys and values (kv_heads, tokens, head_dim)."""


def _layer_router(sinks: list[LayerSink | None], lengths: list[int]) -> Callable:
    def on_layer(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        for row, (sink, n) in enumerate(zip(sinks, lengths, strict=True)):
            if sink is not None:
                sink.write_layer(layer, keys[row, :, :n], values[row, :, :n])

    return on_layer


@cache
def _cache_argument(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    for name in ("cache", "past_key_values"):  # 5.24 renamed past_key_values to cache
        if name in params:
            return name
    raise TypeError(f"{cls.__name__}.forward takes neither `cache` nor `past_key_values`: {list(params)}")


def cache_argument(text_model: Any) -> str:
    """The name under which this transformers version's text model takes a cache object."""
    return _cache_argument(type(text_model))


class Family(ABC):
    model: Any  # a transformers *ForConditionalGeneration; `None` parts are not loaded
    image_token_id: int
    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def image_tokens(self, grid_thw: list[int]) -> int:
        """How many placeholder tokens an image of this grid occupies in the prompt."""

    @abstractmethod
    def encode(self, images: list[Image.Image]) -> list[Encoded]:
        """Every image through the vision tower in one forward, packed as the tower expects."""

    @abstractmethod
    def positions(self, ids: torch.Tensor, images: list[Encoded]) -> tuple[torch.Tensor, int]:
        """A prompt's (3, tokens) M-RoPE positions and its rope delta."""

    @property
    def text(self) -> Any:
        return self.model.model.language_model

    def kv_layout(self) -> KVLayout:
        cfg = self.text.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, self.dtype, self.device)

    def prefill(self, ids: list[int], images: list[Encoded]) -> Prefilled:
        return self.prefill_batch([(ids, images)])[0]

    @torch.inference_mode()
    def prefill_batch(
        self, prompts: list[tuple[list[int], list[Encoded]]], sinks: list[LayerSink | None] | None = None
    ) -> list[Prefilled]:
        """Several prompts in one forward: padded on the right, each row attending to its own tokens.

        `sinks[i]`, if any, receives row i's KV of each layer as soon as that layer has computed it.
        """
        lengths = [len(ids) for ids, _ in prompts]
        width, batch = max(lengths), len(prompts)
        hidden = self.text.config.hidden_size
        embeds = torch.zeros(batch, width, hidden, dtype=self.dtype, device=self.device)
        positions = torch.zeros(3, batch, width, dtype=torch.long, device=self.device)
        deltas = []
        for row, (ids, images) in enumerate(prompts):
            input_ids = torch.tensor(ids, device=self.device)
            embeds[row, : len(ids)] = self._embed(input_ids, images)
            pos, delta = self.positions(input_ids, images)
            positions[:, row, : len(ids)] = pos
            deltas.append(delta)
        length = torch.tensor(lengths, device=self.device)
        keys = torch.arange(width, device=self.device)
        mask = (keys[None, :] <= keys[:, None])[None] & (keys < length[:, None])[:, None, :]  # causal, own row
        view = PrefillView(_layer_router(sinks, lengths) if sinks and any(sinks) else None)
        out = self.text(
            inputs_embeds=embeds,
            attention_mask={"full_attention": self._mask(mask[:, None])},
            position_ids=positions,
            **{cache_argument(self.text): view},
            use_cache=True,
        )
        last = out.last_hidden_state[torch.arange(batch, device=self.device), length - 1]
        logits = self.model.lm_head(last).float()
        return [Prefilled(logits[i], d, view, i, n) for i, (n, d) in enumerate(zip(lengths, deltas, strict=True))]

    @torch.inference_mode()
    def decode_step(
        self, tokens: list[int] | torch.Tensor, positions: list[int] | torch.Tensor, view: StepView
    ) -> torch.Tensor:
        """One token for each sequence of the batch (`positions`: M-RoPE ones); (batch, vocab) logits.

        Given device tensors (as `cuda_graphs.py` does) it launches device work only, so it can be captured.
        """
        ids = torch.as_tensor(tokens, device=self.device).view(-1, 1)
        pos = torch.as_tensor(positions, device=self.device).view(1, -1, 1).expand(3, -1, 1)
        out = self.text(
            inputs_embeds=self.text.embed_tokens(ids),
            attention_mask={"full_attention": self._mask(view.mask)},
            position_ids=pos,
            **{cache_argument(self.text): view},
            use_cache=True,
        )
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def _mask(self, keep: torch.Tensor) -> torch.Tensor:
        """A boolean mask as the text model's attention takes it: as is (sdpa), or additive (eager)."""
        if self.text.config._attn_implementation == "sdpa":
            return keep
        return torch.zeros(keep.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~keep, torch.finfo(self.dtype).min
        )

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
