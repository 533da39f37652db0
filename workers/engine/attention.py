"""Attention over the paged KV cache: the two operations a forward needs, and the cache write.

Each has a plain-torch implementation (the CPU path, what CI runs, and the reference) and, on CUDA,
a dispatch to the Triton kernels of `triton_attention.py`, imported on first use so that nothing on
the CPU path imports triton. Shapes:

- `paged_decode`: one query token per sequence against its cached keys and values, read in place
  through its block table. Grouped-query attention: heads // kv_heads query heads share a KV head.
- `varlen_prefill`: whole prompts packed back to back (no padding), causal within each prompt.
- `varlen_attention`: the same packing, causal or not (`causal=False`: the vision towers, each image or
  window attending to all of itself).
- `store_kv`: the step's keys and values into their cache slots (flat slot = block * block_tokens + offset).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

_kernels: ModuleType | None | bool = False  # False: not looked for yet; None: not available


def triton_kernels() -> ModuleType | None:
    """The Triton kernels, when this machine can run them (asked only for CUDA tensors)."""
    global _kernels
    if _kernels is False:
        try:
            from epd.workers.engine import triton_attention

            _kernels = triton_attention
        except ImportError:  # no triton here
            _kernels = None
    return _kernels  # type: ignore[return-value]


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v (tokens, kv_heads, dim) into one layer's cache (blocks, block_tokens, kv_heads, dim) at slots (tokens,)."""
    _, _, heads, dim = k_cache.shape
    k_cache.view(-1, heads, dim).index_copy_(0, slots, k)
    v_cache.view(-1, heads, dim).index_copy_(0, slots, v)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q (batch, heads, dim) against each row's first seq_lens[i] cached tokens -> (batch, heads, dim)."""
    if q.is_cuda and (kernels := triton_kernels()) is not None:
        return kernels.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_torch(q, k_cache, v_cache, block_tables, seq_lens, scale)


def varlen_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """q (tokens, heads, dim), k/v (tokens, kv_heads, dim) of packed prompts -> (tokens, heads, dim), causal."""
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal=True)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """q (tokens, heads, dim), k/v (tokens, kv_heads, dim) of packed sequences -> (tokens, heads, dim): one kernel
    launch on CUDA for every sequence, one SDPA per sequence on the CPU."""
    if q.is_cuda and (kernels := triton_kernels()) is not None:
        return kernels.varlen_prefill(q, k, v, cu_seqlens, max_seqlen, scale, causal=causal)
    return varlen_prefill_torch(q, k, v, cu_seqlens, scale, causal=causal)


def paged_decode_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The reference: gathers each row's blocks (batch, width * block_tokens, kv_heads, dim) and masks the rest."""
    batch, heads, dim = q.shape
    _, block, kv_heads, _ = k_cache.shape
    tables = block_tables.long()
    k = k_cache[tables].reshape(batch, -1, kv_heads, dim)  # (batch, keys, kv_heads, dim)
    v = v_cache[tables].reshape(batch, -1, kv_heads, dim)
    qg = q.view(batch, kv_heads, heads // kv_heads, dim)  # the query heads that share each KV head
    scores = torch.einsum("bhgd,bthd->bhgt", qg.float(), k.float()) * scale
    keys = torch.arange(k.shape[1], device=q.device)
    hidden = keys[None, :] >= seq_lens[:, None].long()  # (batch, keys)
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a padding row (seq_len 0) has no key: zeros
    out = torch.einsum("bhgt,bthd->bhgd", probs, v.float())
    return out.reshape(batch, heads, dim).to(q.dtype)


def varlen_prefill_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, causal: bool = True
) -> torch.Tensor:
    """The reference: each prompt through SDPA in turn (one host read of `cu_seqlens`)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:], strict=False):
        # (heads, n, dim): SDPA's layout; enable_gqa shares each KV head among its query heads
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=causal, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
    return out
