"""The decoder's KV cache: preallocated blocks, and a block table per sequence.

Memory is taken once, at start, from a budget (`EPD_KV_CACHE_MB`): one tensor for keys and one
for values, (layers, blocks, block_tokens, kv_heads, head_dim), the layout the attention kernels
read in place (a token's heads and dims are contiguous; flat slot = block * block_tokens + offset).

Blocks are handed out as sequences grow (`grow`), one block at a time, not for a whole
generation at admission: concurrency is bounded by what sequences hold, not by what they might.
What happens when the blocks run out is the decode batch's policy (`workers/decode_batch.py`:
the newest sequence is preempted).

A prompt's KV enters and leaves in the wire shape the connectors use, (layers, 2, kv_heads,
tokens, head_dim): `write` and `read`.
"""

from __future__ import annotations

import math
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


@dataclass
class StepInputs:
    """A decode step's cache metadata as device tensors (a CUDA graph's inputs)."""

    slots: torch.Tensor  # (batch,) int64: where each sequence's new token's KV goes
    tables: torch.Tensor  # (batch, width) int32 block ids; entries past a sequence's end are never read
    seq_lens: torch.Tensor  # (batch,) int32: tokens attended, the new one included; 0 for a padding row


class PagedKVCache:
    def __init__(self, layout: KVLayout, budget_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.layout, self.block_tokens = layout, block_tokens
        self.blocks = budget_bytes // (layout.bytes_per_token() * block_tokens)
        if self.blocks < 1:
            raise ValueError(
                f"a KV cache budget of {budget_bytes} bytes holds no block of {block_tokens} tokens "
                f"({layout.bytes_per_token()} bytes a token)"
            )
        shape = (layout.layers, self.blocks, block_tokens, layout.kv_heads, layout.head_dim)
        # zeros, not empty: a padding row's attention may read a block, and must read finite numbers
        self.k = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        self.v = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        self._free = list(range(self.blocks - 1, -1, -1))  # a stack: low block ids first

    @property
    def capacity_tokens(self) -> int:
        return self.blocks * self.block_tokens

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.block_tokens

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_tokens)

    def reserve(self, tokens: int) -> list[int] | None:
        """Blocks for `tokens` tokens, or None while too few are free (all or nothing)."""
        n = self.blocks_for(tokens)
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def grow(self, blocks: list[int], tokens: int) -> bool:
        """Extend a block table in place to hold `tokens` tokens; False (nothing taken) if too few are free."""
        more = self.blocks_for(tokens) - len(blocks)
        if more > len(self._free):
            return False
        blocks.extend(self._free.pop() for _ in range(max(0, more)))
        return True

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()  # a second release of the same table frees nothing

    def write(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Store a KV, (layers, 2, kv_heads, tokens, head_dim), in `blocks` from position 0."""
        layers, _, heads, tokens, dim = kv.shape
        n = self.blocks_for(tokens)
        # onto the cache's device first, in one contiguous copy: a KV that arrived in host memory (a decoder's
        # direct or store path, a swapped-out sequence) is reordered there. The reorder on the host took 98-113 ms
        # for a 2,512-token 7B KV (137 MiB, 2 vCPUs), and the whole batch's next step waits for the write
        kv = kv.to(self.layout.device)
        # (layers, 2, heads, tokens, dim) -> (2, layers, tokens, heads, dim), padded to whole blocks
        paged = torch.zeros(2, layers, n * self.block_tokens, heads, dim, dtype=self.layout.dtype, device=kv.device)
        paged[:, :, :tokens] = kv.permute(1, 0, 3, 2, 4)
        paged = paged.view(2, layers, n, self.block_tokens, heads, dim)
        index = torch.tensor(blocks[:n], device=self.layout.device)
        self.k[:, index] = paged[0]
        self.v[:, index] = paged[1]

    def read(self, blocks: list[int], tokens: int) -> torch.Tensor:
        """The inverse of `write`: (layers, 2, kv_heads, tokens, head_dim)."""
        index = torch.tensor(blocks[: self.blocks_for(tokens)], device=self.layout.device)
        both = torch.stack([self.k[:, index], self.v[:, index]], dim=1)  # (layers, 2, n, block, heads, dim)
        layers, _, n, block, heads, dim = both.shape
        return both.reshape(layers, 2, n * block, heads, dim)[:, :, :tokens].transpose(2, 3)

    def slot(self, blocks: list[int], position: int) -> int:
        """The flat slot of a sequence's token at `position`."""
        return blocks[position // self.block_tokens] * self.block_tokens + position % self.block_tokens

    def step_inputs(self, tables: list[list[int]], lengths: list[int]) -> StepInputs:
        """One decode step of these sequences (`lengths`: tokens each holds now; its blocks cover one more)."""
        device = self.layout.device
        width = max(self.blocks_for(n + 1) for n in lengths)
        return StepInputs(
            torch.tensor([self.slot(t, n) for t, n in zip(tables, lengths, strict=True)], device=device),
            torch.tensor(table_rows(tables, width, fill=0), dtype=torch.int32, device=device),
            torch.tensor([n + 1 for n in lengths], dtype=torch.int32, device=device),
        )


def table_rows(tables: list[list[int]], width: int, fill: int) -> list[list[int]]:
    """Each block table cut or padded to `width` with `fill` (never read: past the sequence's length)."""
    return [t[:width] + [fill] * (width - len(t[:width])) for t in tables]
