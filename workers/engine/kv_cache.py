"""The decoder's KV cache: preallocated blocks, and a block table per sequence.

Memory is taken once, at start, from a budget (`EPD_KV_CACHE_MB`): one tensor of
fixed-size blocks for keys and one for values, per layer. A sequence reserves the
blocks for its whole generation when it is admitted (prompt plus `max_tokens`, at
most the model's length), so a running sequence never runs out and nothing has to
be preempted; admission waits while the blocks are taken.

A decode step sees the cache through a `StepView`: transformers' attention layers
call `update(keys, values, layer)` with the batch's new token, the view writes it
into each sequence's next slot and returns every sequence's keys and values
gathered into one padded tensor, with the mask that hides the padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class PagedKVCache:
    def __init__(self, layout: KVLayout, budget_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.layout, self.block_tokens = layout, block_tokens
        self.blocks = budget_bytes // (layout.bytes_per_token() * block_tokens)
        if self.blocks < 1:
            raise ValueError(
                f"a KV cache budget of {budget_bytes} bytes holds no block of {block_tokens} tokens "
                f"({layout.bytes_per_token()} bytes a token)"
            )
        shape = (layout.layers, self.blocks, layout.kv_heads, block_tokens, layout.head_dim)
        self.k = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        self.v = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        self._free = list(range(self.blocks - 1, -1, -1))  # a stack: low block ids first

    @property
    def capacity_tokens(self) -> int:
        return self.blocks * self.block_tokens

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.block_tokens

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_tokens)

    def reserve(self, tokens: int) -> list[int] | None:
        """Blocks for `tokens` tokens, or None while too few are free."""
        n = self.blocks_for(tokens)
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()  # a second release of the same table frees nothing

    def write(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Store a prompt's KV, (layers, 2, kv_heads, tokens, head_dim), in `blocks` from position 0."""
        layers, _, heads, tokens, dim = kv.shape
        n = self.blocks_for(tokens)
        padded = torch.zeros(layers, 2, heads, n * self.block_tokens, dim, dtype=self.layout.dtype, device=kv.device)
        padded[:, :, :, :tokens] = kv
        # (layers, 2, heads, n, block, dim) -> (2, layers, n, heads, block, dim)
        paged = padded.view(layers, 2, heads, n, self.block_tokens, dim).permute(1, 0, 3, 2, 4, 5)
        index = torch.tensor(blocks[:n], device=self.layout.device)
        self.k[:, index] = paged[0].to(self.layout.device)
        self.v[:, index] = paged[1].to(self.layout.device)

    def read(self, blocks: list[int], tokens: int) -> torch.Tensor:
        """The inverse of `write`: (layers, 2, kv_heads, tokens, head_dim)."""
        index = torch.tensor(blocks[: self.blocks_for(tokens)], device=self.layout.device)
        both = torch.stack([self.k[:, index], self.v[:, index]], dim=1)  # (layers, 2, n, heads, block, dim)
        layers, _, n, heads, block, dim = both.shape
        return both.permute(0, 1, 3, 2, 4, 5).reshape(layers, 2, heads, n * block, dim)[:, :, :, :tokens]

    def step_width(self, lengths: list[int]) -> int:
        """Blocks the longest of these sequences needs after one more token."""
        return max(self.blocks_for(n + 1) for n in lengths)

    def step_view(self, tables: list[list[int]], lengths: list[int]) -> StepView:
        """The cache as one decode step of these sequences sees it; `lengths`: tokens each holds now."""
        device = self.layout.device
        rows = torch.tensor(table_rows(tables, self.step_width(lengths), fill=0), device=device)
        return StepView(self, rows, torch.tensor(lengths, device=device))


def table_rows(tables: list[list[int]], width: int, fill: int) -> list[list[int]]:
    """Each block table cut or padded to `width` with `fill` (never attended to: the mask hides it)."""
    return [t[:width] + [fill] * (width - len(t[:width])) for t in tables]


def layer_of(args: tuple, kwargs: dict) -> int:
    """The layer index of a `Cache.update(keys, values, layer_idx, ...)` call, in any convention that transformers
    5.x has used: positional (up to 5.23, then `cache_kwargs`), or `layer_idx=` by keyword; the rest (5.24's
    `kwargs=`) is ignored. Anything else fails here, naming the call, rather than deep inside attention."""
    layer = args[0] if args else kwargs.get("layer_idx")
    if not isinstance(layer, int):
        raise TypeError(
            f"transformers called Cache.update(keys, values, *{args!r}, **{sorted(kwargs)!r}): "
            "no layer index as the third argument or `layer_idx=`; this calling convention is not supported"
        )
    return layer


class StepView:
    """One decode step's window on the cache, in the shape of a transformers `Cache` (only `update`).

    Built from device tensors alone, so that a CUDA graph can capture it: `tables` (batch, width)
    block ids (entries past a sequence's end are never attended to) and `lengths` (batch,).
    """

    def __init__(self, cache: PagedKVCache, tables: torch.Tensor, lengths: torch.Tensor) -> None:
        bs = cache.block_tokens
        self.cache, self.tables = cache, tables
        rows = torch.arange(tables.shape[0], device=tables.device)
        self._slot = (tables[rows, lengths // bs], lengths % bs)  # where each new token goes
        keys = torch.arange(tables.shape[1] * bs, device=tables.device)
        # (batch, 1, 1, keys): a sequence attends to its own tokens and the new one
        self.mask = (keys[None, :] <= lengths[:, None])[:, None, None, :]

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: object, **kwargs: object) -> tuple:
        """Store the step's (batch, kv_heads, 1, head_dim) keys and values; return all of each sequence's."""
        layer = layer_of(args, kwargs)
        block, offset = self._slot
        k, v = self.cache.k[layer], self.cache.v[layer]
        k[block, :, offset] = keys[:, :, 0]
        v[block, :, offset] = values[:, :, 0]
        return _gather(k, self.tables), _gather(v, self.tables)


def _gather(store: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """(blocks, heads, block, dim) by (batch, width) tables -> (batch, heads, width * block, dim)."""
    batch, width = tables.shape
    _, heads, block, dim = store.shape
    return store[tables].permute(0, 2, 1, 3, 4).reshape(batch, heads, width * block, dim)


class PrefillView:
    """A prefill forward's cache: keeps each layer's keys and values as computed, for the whole batch."""

    def __init__(self, on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """`on_layer(layer, keys, values)`: called as each layer's KV is computed (the direct KV transfer)."""
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.on_layer = on_layer

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: object, **kwargs: object) -> tuple:
        layer = layer_of(args, kwargs)
        self.keys[layer], self.values[layer] = keys, values
        if self.on_layer is not None:
            self.on_layer(layer, keys, values)
        return keys, values

    def row(self, i: int, tokens: int) -> torch.Tensor:
        """Row `i`'s KV, (layers, 2, kv_heads, tokens, head_dim)."""
        return torch.stack(
            [torch.stack([self.keys[n][i, :, :tokens], self.values[n][i, :, :tokens]]) for n in sorted(self.keys)]
        )
