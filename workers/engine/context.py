"""One forward's step metadata, set once per step so that layers take no extra arguments.

A forward runs over a FLAT batch of tokens, (tokens, hidden). A prefill packs whole prompts
back to back (`cu_seqlens`: where each starts); a decode step has one token per sequence and
reads the paged cache (`block_tables`, `seq_lens`). `slot_mapping` says where each token's keys
and values go in the cache (flat slot = block * block_tokens + offset); a prefill without a cache
keeps them instead (`kept`), for the prompt's KV handoff and the layer-by-layer sink.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    prefill: bool
    cu_seqlens: torch.Tensor | None = None  # (seqs + 1,) int32, prefill
    max_seqlen: int = 0  # prefill
    slot_mapping: torch.Tensor | None = None  # (tokens,) int64: where each token's KV goes; None: no cache
    block_tables: torch.Tensor | None = None  # (seqs, width) int32, decode
    seq_lens: torch.Tensor | None = None  # (seqs,) int32 tokens attended, the new one included; 0: padding row
    k_cache: torch.Tensor | None = None  # (layers, blocks, block_tokens, kv_heads, head_dim)
    v_cache: torch.Tensor | None = None
    on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None  # prefill: each layer's (k, v)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # prefill: (tokens, kv_heads, dim)


# per thread: in the pd and epd roles a prefill and a decode step can run at once, each in its own thread
_local = threading.local()


def get_context() -> Context:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("a model forward ran outside `step_context`")
    return ctx


@contextmanager
def step_context(ctx: Context) -> Iterator[Context]:
    """Make `ctx` this thread's running forward's metadata."""
    previous = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = previous
