"""Triton attention kernels that read the paged KV cache in place (CUDA only).

Two operations, with the same signatures as the plain-torch versions in `attention.py` (the CPU path):

- `paged_decode`: one new query token per sequence against that sequence's keys and values, read
  block by block through its block table. One program serves one KV head of one sequence and all the
  query heads that share it (grouped-query attention: the KV tile is loaded once for the whole group,
  never expanded). When batch x kv_heads programs would leave the multiprocessors idle, the context is
  split into fixed partitions read by separate programs (flash-decoding) and a second kernel merges
  their partial softmaxes. The split depends on shapes only, so a step can be captured in a CUDA graph.
- `varlen_prefill`: causal attention over a flat batch of prompts laid end to end (`cu_seqlens`), a
  flash-attention forward: tiles of queries against tiles of keys with an online softmax, no padding.
  `causal=False` is the vision towers' attention: each image (or window) attends to all of itself, one
  launch for every segment of a pack; a head dim that is not a power of two (80) is padded in registers.

Beside them, fused kernels for the model's own layers: `fused_add_rmsnorm`, `silu_and_mul`, and
`rope_and_store` (the rotary turn of q and k in place, and k and v into their cache slots).

Layouts: q (batch, heads, dim); one layer's cache (num_blocks, block_tokens, kv_heads, dim), contiguous;
block_tables (batch, max_blocks) int32; seq_lens (batch,) int32, the tokens to attend, the current one
included. Softmax runs in float32 in base 2 (`exp2` on scores pre-multiplied by scale * log2 e).
float32 inputs use exact float32 products (not tf32), so the float32 path can be compared tightly.

This module imports triton at import time: import it lazily, on CUDA only.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # partitions per sequence at most; the merge kernel holds them all in registers


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the Triton interpreter on a CPU: size the split as for an H200
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" only matters for float32 operands


def decode_partition(batch: int, programs_per_sequence: int, max_context: int, device: torch.device) -> int:
    """Tokens per program in `paged_decode`: the whole context (no split) when the programs of an unsplit launch
    already give every multiprocessor one or two, else a fixed partition, smaller for smaller batches.
    Shapes only: the same for every step of one CUDA-graph bucket. (H200, 28/4 heads: batch 64 ran best
    unsplit, 1 to 32 with 64-token partitions; `bench/attention_gpu.py` sweeps these.)"""
    programs = batch * programs_per_sequence
    sms = _multiprocessors(device)
    if programs >= 3 * sms // 2:
        return max(max_context, 16)
    partition = 64 if programs <= sms else 128
    while math.ceil(max_context / partition) > MAX_SPLITS:
        partition *= 2
    return partition


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_tb,
    stride_ob,
    stride_oh,
    HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    start = split * PARTITION
    if SPLITS > 1:
        if start >= seq_len:
            return  # past this sequence's end: the merge kernel reads only partitions that hold tokens
        end = tl.minimum(start + PARTITION, seq_len)
    else:
        end = seq_len

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    # The group's query rows, padded to at least 16 for the tensor-core product; padding rows are zeros.
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_tb
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        block = tl.load(table + n // BLOCK_TOKENS, mask=nmask, other=0).to(tl.int64)
        row = block * stride_cb + (n % BLOCK_TOKENS) * stride_ct + kvh * stride_ch  # (BLOCK_N,) token rows
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (GROUP_PAD, BLOCK_N)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if SPLITS > 1:
        # Unnormalised partials, (batch, heads, SPLITS[, dim]) float32.
        slot = (b * HEADS + heads) * SPLITS + split
        tl.store(part_acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        tl.store(part_m_ptr + slot, m_i, mask=gmask)
        tl.store(part_l_ptr + slot, l_i, mask=gmask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # seq_len 0 (graph padding): zeros, not NaN
        o = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o, out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _decode_seq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_tb,
    stride_ob,
    stride_oh,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    KV_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """`_decode_kernel` with every KV head of the sequence in one program: a token's keys for all heads are one
    contiguous row (kv_heads x dim), so each block is read as one contiguous run instead of kv_heads strided
    slices. The products are batched over KV heads: (kv, group, dim) x (kv, dim, tokens)."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b)
    start = split * PARTITION
    if SPLITS > 1:
        if start >= seq_len:
            return
        end = tl.minimum(start + PARTITION, seq_len)
    else:
        end = seq_len

    hk = tl.arange(0, KV_PAD)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = hk[:, None] * GROUP + g[None, :]  # (KV_PAD, GROUP_PAD)
    hmask = (hk[:, None] < KV_HEADS) & (g[None, :] < GROUP)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, :, None] * stride_qh + d[None, None, :], mask=hmask[:, :, None], other=0.0
    )

    m_i = tl.full([KV_PAD, GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([KV_PAD, GROUP_PAD], tl.float32)
    acc = tl.zeros([KV_PAD, GROUP_PAD, HEAD_DIM], tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_tb
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        block = tl.load(table + n // BLOCK_TOKENS, mask=nmask, other=0).to(tl.int64)
        row = block * stride_cb + (n % BLOCK_TOKENS) * stride_ct
        offs = hk[:, None, None] * stride_ch + row[None, :, None] + d[None, None, :]  # (KV_PAD, BLOCK_N, HEAD_DIM)
        kv_mask = (hk[:, None, None] < KV_HEADS) & nmask[None, :, None]
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PRECISION) * scale_log2  # (KV, GROUP, BLOCK_N)
        s = tl.where(nmask[None, None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if SPLITS > 1:
        slot = (b * HEADS + heads) * SPLITS + split
        tl.store(part_acc_ptr + slot[:, :, None] * HEAD_DIM + d[None, None, :], acc, mask=hmask[:, :, None])
        tl.store(part_m_ptr + slot, m_i, mask=hmask)
        tl.store(part_l_ptr + slot, l_i, mask=hmask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, :, None]
        o = out_ptr + b * stride_ob + heads[:, :, None] * stride_oh + d[None, None, :]
        tl.store(o, out.to(out_ptr.dtype.element_ty), mask=hmask[:, :, None])


@triton.jit
def _decode_merge_kernel(
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    lens_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PARTITION: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    used = tl.cdiv(tl.load(lens_ptr + b), PARTITION)  # partitions the first kernel wrote
    s = tl.arange(0, SPLITS_PAD)
    smask = s < used
    slot = (b * HEADS + h) * SPLITS + s
    m = tl.load(part_m_ptr + slot, mask=smask, other=float("-inf"))
    total = tl.load(part_l_ptr + slot, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # unwritten partitions weigh 0
    denom = tl.sum(w * total, 0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _check_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor
) -> None:
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[3] != dim:
        raise ValueError(f"k/v caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k/v caches must be contiguous (num_blocks, block_tokens, kv_heads, head_dim)")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} KV heads")
    block_tokens = k_cache.shape[1]
    if block_tokens < 16 or block_tokens & (block_tokens - 1) or dim < 16 or dim & (dim - 1):
        raise ValueError(f"block_tokens {block_tokens} and head_dim {dim} must be powers of two >= 16")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)}, seq_lens {tuple(seq_lens.shape)}: batch {batch}")


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of each sequence's one query token over its cached keys/values -> (batch, heads, head_dim)."""
    return _paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)


def _paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    partition: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    per_sequence: bool = False,
) -> torch.Tensor:
    """`paged_decode` with its tuning knobs exposed (the benchmark sweeps them); `partition` 0 means no split.
    `per_sequence` runs one program per sequence (all its KV heads) instead of one per (sequence, KV head)."""
    _check_decode(q, k_cache, v_cache, block_tables, seq_lens)
    batch, heads, dim = q.shape
    _, block_tokens, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    max_context = block_tables.shape[1] * block_tokens
    if partition is None:
        partition = decode_partition(batch, 1 if per_sequence else kv_heads, max_context, q.device)
    splits = 1 if partition == 0 or partition >= max_context else math.ceil(max_context / partition)
    if splits == 1:
        partition = max(max_context, 16)
    if block_n is None:
        block_n = (32 if per_sequence else 64) if q.dtype != torch.float32 else (16 if per_sequence else 32)
    block_n = min(block_n, triton.next_power_of_2(partition))
    if num_warps is None:
        num_warps = 8 if per_sequence else 4
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if splits > 1:
        part_acc = torch.empty(batch, heads, splits, dim, device=q.device, dtype=torch.float32)
        part_m = torch.empty(batch, heads, splits, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    args = (
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_acc,
        part_m,
        part_l,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
    )
    common = dict(
        HEADS=heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim,
        BLOCK_TOKENS=block_tokens,
        BLOCK_N=block_n,
        PARTITION=partition,
        SPLITS=splits,
        PRECISION=_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if per_sequence:
        _decode_seq_kernel[(batch, splits)](*args, KV_HEADS=kv_heads, KV_PAD=triton.next_power_of_2(kv_heads), **common)
    else:
        _decode_kernel[(batch, kv_heads, splits)](*args, **common)
    if splits > 1:
        _decode_merge_kernel[(batch, heads)](
            part_acc,
            part_m,
            part_l,
            seq_lens,
            out,
            out.stride(0),
            out.stride(1),
            HEADS=heads,
            HEAD_DIM=dim,
            PARTITION=partition,
            SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits),
            num_warps=4,
        )
    return out


@triton.jit
def _prefill_tile(
    acc,
    m_i,
    l_i,
    q,
    k_tile,
    v_tile,
    rows,
    n0,
    seq_len,
    scale_log2,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    END_MASK: tl.constexpr = False,
):
    cols = n0 + tl.arange(0, BLOCK_N)
    s = tl.dot(q, tl.trans(k_tile), input_precision=PRECISION) * scale_log2
    if CAUSAL_MASK:
        s = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < seq_len), s, float("-inf"))
    if END_MASK:
        s = tl.where(cols[None, :] < seq_len, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cu_ptr,
    out_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # HEAD_PAD: head_dim rounded up to a power of two (tl.arange needs one; the vision towers' is 80), the
    # columns past HEAD_DIM loaded as zeros and never stored. CAUSAL=False: every query sees its whole sequence
    # (the vision towers' images and windows).
    # The last query tiles see the most keys: hand them out first so the tail of the grid is short work.
    mb = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    first = tl.load(cu_ptr + b)
    seq_len = tl.load(cu_ptr + b + 1) - first
    m0 = mb * BLOCK_M
    if m0 >= seq_len:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < seq_len
    d = tl.arange(0, HEAD_PAD)
    dmask = d < HEAD_DIM
    tok = (first + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0
    )
    k_base = k_ptr + first.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = v_ptr + first.to(tl.int64) * stride_vt + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    if CAUSAL:
        # Key tiles wholly before this query tile: every key is visible to every row, no mask.
        for n0 in range(0, m0, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + cols[:, None] * stride_kt + d[None, :], mask=dmask[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :], mask=dmask[None, :], other=0.0)
            acc, m_i, l_i = _prefill_tile(
                acc, m_i, l_i, q, k, v, rows, n0, seq_len, scale_log2, BLOCK_N, False, PRECISION
            )
        # The diagonal: causal mask, and the sequence's end.
        for n0 in range(m0, tl.minimum(m0 + BLOCK_M, seq_len), BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < seq_len
            kvmask = cmask[:, None] & dmask[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kt + d[None, :], mask=kvmask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :], mask=kvmask, other=0.0)
            acc, m_i, l_i = _prefill_tile(
                acc, m_i, l_i, q, k, v, rows, n0, seq_len, scale_log2, BLOCK_N, True, PRECISION
            )
    else:
        # Whole key tiles unmasked, then the ragged last one masked at the sequence's end.
        whole = (seq_len // BLOCK_N) * BLOCK_N
        for n0 in range(0, whole, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + cols[:, None] * stride_kt + d[None, :], mask=dmask[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :], mask=dmask[None, :], other=0.0)
            acc, m_i, l_i = _prefill_tile(
                acc, m_i, l_i, q, k, v, rows, n0, seq_len, scale_log2, BLOCK_N, False, PRECISION
            )
        if whole < seq_len:
            cols = whole + tl.arange(0, BLOCK_N)
            kvmask = (cols < seq_len)[:, None] & dmask[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kt + d[None, :], mask=kvmask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :], mask=kvmask, other=0.0)
            acc, m_i, l_i = _prefill_tile(
                acc, m_i, l_i, q, k, v, rows, whole, seq_len, scale_log2, BLOCK_N, False, PRECISION, True
            )
    out = acc / l_i[:, None]  # every real row sees at least its own key: l_i > 0
    o = out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def varlen_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """Attention within each of the sequences laid end to end in q/k/v -> (tokens, heads, head_dim); causal, or
    (`causal=False`) every token of a sequence seeing all of it."""
    return _varlen_prefill(q, k, v, cu_seqlens, max_seqlen, scale, causal=causal)


def _varlen_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    causal: bool = True,
) -> torch.Tensor:
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape != (tokens, kv_heads, dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if heads % kv_heads or dim < 16 or dim % 8:
        raise ValueError(f"{heads} heads over {kv_heads} KV heads, head_dim {dim}: need a whole group, dim 8n >= 16")
    pad = triton.next_power_of_2(dim)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be int32")
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    wide = q.dtype == torch.float32 or pad > 128  # bigger elements or rows: smaller tiles to fit shared memory
    # 64 x 64 tiles, 4 warps, 3 stages: the best of the sweep for 8 x 1,024 bf16 tokens on an H200 (199 us against
    # 214 us for 128 x 64 with 8 warps); bench/attention_gpu.py
    block_m = block_m or 64
    block_n = block_n or (32 if wide else 64)
    num_warps = num_warps or 4
    num_stages = num_stages or (2 if wide else 3)
    out = torch.empty_like(q)
    batch = cu_seqlens.shape[0] - 1
    if tokens == 0 or batch == 0:
        return out
    grid = (triton.cdiv(max(int(max_seqlen), 1), block_m), batch, heads)
    _prefill_kernel[grid](
        q,
        k,
        v,
        cu_seqlens,
        out,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=heads // kv_heads,
        HEAD_DIM=dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=_precision(q.dtype),
        CAUSAL=causal,
        HEAD_PAD=pad,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, stride_x, stride_r, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
    total = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded to the activations' dtype, as the model
    tl.store(res_ptr + row * stride_r + cols, total, mask=mask)
    t = total.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(t * t, 0) / hidden + eps)
    normed = (t * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * stride_x + cols, (normed * w).to(x.dtype), mask=mask)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; x = RMSNorm(residual) * weight, both in place, rounding as Qwen2's modules do (the sum and
    the normalised value each rounded to the activations' dtype). x, residual (tokens, hidden) -> (x, residual)."""
    if x.shape != residual.shape or x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)}, residual {tuple(residual.shape)}, weight {tuple(weight.shape)}")
    if x.stride(1) != 1 or residual.stride(1) != 1:
        raise ValueError("x and residual need contiguous rows")
    if x.shape[0]:
        hidden = x.shape[1]
        _add_rmsnorm_kernel[(x.shape[0],)](
            x,
            residual,
            weight,
            x.stride(0),
            residual.stride(0),
            hidden,
            eps,
            BLOCK=triton.next_power_of_2(hidden),
            num_warps=8 if hidden > 2048 else 4,
        )
    return x, residual


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # SiLU rounded to the activations' dtype, then the product
    tl.store(out_ptr + row * stride_out + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused gate-up projection output (tokens, 2 x inter) -> (tokens, inter)."""
    tokens, double = gate_up.shape
    if double % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} must have an even number of contiguous columns")
    inter = double // 2
    out = torch.empty(tokens, inter, device=gate_up.device, dtype=gate_up.dtype)
    if tokens:
        block = 1024
        _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
        )
    return out


@triton.jit
def _rounded(x, dt: tl.constexpr):
    """float32 x rounded to dt's precision (to nearest, ties to even), kept in float32: as a torch op on dt tensors
    stores it. For bf16 by its bits: a plain .to(bf16).to(float32) round trip may be folded away by the compiler."""
    if dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dt == tl.float32:
        return x
    else:
        return x.to(dt).to(tl.float32)


@triton.jit
def _rope_store_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_t,
    stride_h,
    stride_cs,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    ROT_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    STORE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, ROT_PAD)  # the query heads, then the key heads: both turned
    d = tl.arange(0, HALF)
    rotated = h < HEADS + KV_HEADS
    first = qkv_ptr + t * stride_t + h[:, None] * stride_h + d[None, :]  # (ROT_PAD, half)
    x1 = tl.load(first, mask=rotated[:, None], other=0.0)
    x2 = tl.load(first + HALF, mask=rotated[:, None], other=0.0)
    c1 = tl.load(cos_ptr + t * stride_cs + d)[None, :].to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_cs + HALF + d)[None, :].to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_cs + d)[None, :].to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_cs + HALF + d)[None, :].to(tl.float32)
    dt = x1.dtype
    a1, b1 = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product and the sum rounded to the activations' dtype as the modules do
    o1 = (_rounded(a1 * c1, dt) + _rounded(-b1 * s1, dt)).to(dt)
    o2 = (_rounded(b1 * c2, dt) + _rounded(a1 * s2, dt)).to(dt)
    tl.store(first, o1, mask=rotated[:, None])
    tl.store(first + HALF, o2, mask=rotated[:, None])
    if STORE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        row = slot * (KV_HEADS * HEAD_DIM)
        kh = h - HEADS  # the key heads among the turned ones
        is_k = rotated & (kh >= 0)
        dst = row + kh[:, None] * HEAD_DIM + d[None, :]
        tl.store(k_cache_ptr + dst, o1, mask=is_k[:, None])
        tl.store(k_cache_ptr + dst + HALF, o2, mask=is_k[:, None])
        vh = tl.arange(0, KV_PAD)
        vmask = vh < KV_HEADS
        full = tl.arange(0, HEAD_DIM)
        v_rows = qkv_ptr + t * stride_t + (HEADS + KV_HEADS + vh)[:, None] * stride_h
        v = tl.load(v_rows + full[None, :], mask=vmask[:, None])
        tl.store(v_cache_ptr + row + vh[:, None] * HEAD_DIM + full[None, :], v, mask=vmask[:, None])


def rope_and_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> None:
    """In one kernel: the rotary embeddings turn q's and k's heads of `qkv` (tokens, heads + 2 kv_heads, dim) in
    place, and, given a cache, k and v go to their slots of one layer's cache (blocks, block_tokens, kv_heads, dim).
    cos, sin (tokens, 1, dim) or (tokens, dim). Replaces the rotation's five elementwise kernels and two copies."""
    tokens, rows, dim = qkv.shape
    if rows != heads + 2 * kv_heads or qkv.stride(2) != 1 or dim & (dim - 1) or dim < 16:
        raise ValueError(f"qkv {tuple(qkv.shape)}: need {heads} + 2 x {kv_heads} heads of contiguous 2^n dims")
    cos, sin = cos.reshape(tokens, dim), sin.reshape(tokens, dim)
    if cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError("cos and sin need the same contiguous rows")
    store = slots is not None
    if store and not (
        k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[-2:] == (kv_heads, dim)
        and k_cache.dtype == qkv.dtype and slots.shape == (tokens,)
    ):  # fmt: skip
        raise ValueError(f"cache {tuple(k_cache.shape)} {k_cache.dtype} does not take qkv {tuple(qkv.shape)}")
    if tokens == 0:
        return
    _rope_store_kernel[(tokens,)](
        qkv,
        cos,
        sin,
        slots if store else qkv,
        k_cache if store else qkv,
        v_cache if store else qkv,
        qkv.stride(0),
        qkv.stride(1),
        cos.stride(0),
        HEADS=heads,
        KV_HEADS=kv_heads,
        HEAD_DIM=dim,
        HALF=dim // 2,
        ROT_PAD=triton.next_power_of_2(heads + kv_heads),
        KV_PAD=triton.next_power_of_2(kv_heads),
        STORE=store,
        num_warps=4,
    )
