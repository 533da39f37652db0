"""The Triton attention kernels against a plain-torch reference (gathered blocks, repeated heads, float64 softmax).

Needs a CUDA device; skipped where there is none (CI). `TRITON_INTERPRET=1` runs the same checks on the CPU
through Triton's interpreter (slowly), where triton is installed. Triton is imported only inside the fixture.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import zlib
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.gpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 operands: ~3e-3 relative error expected; float32 runs exact products (not tf32).
TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 5e-3, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    if not torch.cuda.is_available() and not INTERPRET:
        pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1 with triton installed)")
    try:
        return importlib.import_module("epd.workers.engine.triton_attention")
    except ModuleNotFoundError:  # the package is not installed: load the file itself (the GPU machine)
        path = Path(__file__).resolve().parents[1] / "workers" / "engine" / "triton_attention.py"
        spec = importlib.util.spec_from_file_location("triton_attention", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def skip_bf16_in_interpreter(dtype: torch.dtype) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter computes bf16 products wrongly; bf16 is checked on the GPU")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------------
# decode over a paged cache


def reference_decode(q, k_cache, v_cache, tables, lens, scale):
    """Gather every sequence's blocks, repeat the KV heads, masked softmax in float64; zero rows for length 0."""
    batch, heads, dim = q.shape
    _, block_tokens, kv_heads, _ = k_cache.shape
    width = tables.shape[1] * block_tokens
    safe = tables.long().clamp(0, k_cache.shape[0] - 1)  # entries past a sequence's end may be poison
    k = k_cache[safe].reshape(batch, width, kv_heads, dim).double().repeat_interleave(heads // kv_heads, dim=2)
    v = v_cache[safe].reshape(batch, width, kv_heads, dim).double().repeat_interleave(heads // kv_heads, dim=2)
    k = torch.nan_to_num(k)  # unowned blocks hold NaN poison; they sit behind the mask
    v = torch.nan_to_num(v)
    s = torch.einsum("bhd,bthd->bht", q.double(), k) * scale
    visible = torch.arange(width, device=q.device)[None, :] < lens.long()[:, None]
    s = s.masked_fill(~visible[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing visible: zeros
    return torch.einsum("bht,bthd->bhd", p, v)


def make_paged(batch, heads, kv_heads, dim, block_tokens, lens, dtype, gen, extra_width=2):
    """A cache whose blocks are handed out in a shuffled order; unowned blocks and table padding are poison."""
    blocks_per = [math.ceil(n / block_tokens) for n in lens]
    num_blocks = sum(blocks_per) + 7
    k_cache = torch.randn(num_blocks, block_tokens, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_tokens, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per + [1]) + extra_width
    tables = torch.full((batch, width), 1 << 30, dtype=torch.int32)  # far out of bounds if ever dereferenced
    used = set()
    for b, n in enumerate(blocks_per):
        ids = [order.pop() for _ in range(n)]
        used.update(ids)
        tables[b, :n] = torch.tensor(ids, dtype=torch.int32)
    unused = torch.tensor(sorted(set(range(num_blocks)) - used), dtype=torch.long)
    k_cache[unused.to(DEVICE)] = float("nan")
    v_cache[unused.to(DEVICE)] = float("nan")
    q = torch.randn(batch, heads, dim, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, tables.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def ragged_lens(batch: int, gen: torch.Generator, block_tokens: int, longest: int) -> list[int]:
    lens = torch.randint(0, longest + 1, (batch,), generator=gen).tolist()
    planted = [0, 1, block_tokens - 1, block_tokens, block_tokens + 1, longest]  # edges of blocks and partitions
    for i, n in enumerate(planted[:batch]):
        lens[(i * 7) % batch] = n
    return lens


GQA = [(4, 4), (8, 2), (28, 4)]  # ratios 1, 4, 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads,kv_heads", GQA, ids=["gqa1", "gqa4", "gqa7"])
@pytest.mark.parametrize("batch,block_tokens,longest", [(1, 16, 70), (6, 16, 300), (33, 32, 200), (9, 64, 520)])
def test_paged_decode_matches_reference(kernels, dtype, heads, kv_heads, batch, block_tokens, longest) -> None:
    skip_bf16_in_interpreter(dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, heads, kv_heads, batch, block_tokens)).encode()))
    dim = 128 if not INTERPRET else 32
    lens = ragged_lens(batch, gen, block_tokens, longest if not INTERPRET else min(longest, 80))
    q, kc, vc, tables, seq_lens = make_paged(batch, heads, kv_heads, dim, block_tokens, lens, dtype, gen)
    scale = dim**-0.5
    ref = reference_decode(q, kc, vc, tables, seq_lens, scale)
    # The default split, no split and a forced small partition, with a program per KV head or per sequence:
    # six code paths, one answer.
    for partition in (None, 0, 64):
        for per_sequence in (False, True):
            case = f"partition {partition}, per_sequence {per_sequence}"
            out = kernels._paged_decode(
                q, kc, vc, tables, seq_lens, scale, partition=partition, per_sequence=per_sequence
            )
            assert out.shape == q.shape and out.dtype == dtype
            assert torch.isfinite(out).all(), f"{case}: non-finite output"
            err = relative_error(out, ref)
            assert err < TOLERANCE[dtype], f"{case}: relative error {err:.2e}, lens {lens}"
            assert (out[seq_lens == 0] == 0).all(), f"{case}: a padding row (seq_len 0) must come out as zeros"


def test_paged_decode_head_dim_64_and_fp16(kernels) -> None:
    gen = torch.Generator().manual_seed(64)
    lens = [0, 1, 15, 17, 100, 250]
    q, kc, vc, tables, seq_lens = make_paged(6, 14, 2, 64, 16, lens, torch.float16, gen)
    out = kernels.paged_decode(q, kc, vc, tables, seq_lens, 0.125)
    assert relative_error(out, reference_decode(q, kc, vc, tables, seq_lens, 0.125)) < TOLERANCE[torch.float16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("per_sequence", [False, True], ids=["per_kv_head", "per_sequence"])
def test_paged_decode_replays_in_a_cuda_graph(kernels, per_sequence) -> None:
    """Captured once, replayed on new lengths, tables and queries written into the same tensors."""
    gen = torch.Generator().manual_seed(7)
    batch, heads, kv_heads, dim, block_tokens = 8, 28, 4, 128, 16
    lens = ragged_lens(batch, gen, block_tokens, 400)
    q, kc, vc, tables, seq_lens = make_paged(batch, heads, kv_heads, dim, block_tokens, lens, torch.bfloat16, gen)
    scale = dim**-0.5
    kernels._paged_decode(q, kc, vc, tables, seq_lens, scale, per_sequence=per_sequence)  # compile, not capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels._paged_decode(q, kc, vc, tables, seq_lens, scale, per_sequence=per_sequence)
    for _ in range(3):
        lens2 = torch.randint(0, block_tokens * tables.shape[1] + 1, (batch,), generator=gen)
        lens2[0] = 0
        seq_lens.copy_(lens2.to(torch.int32))
        tables.copy_(torch.randint(0, kc.shape[0], tables.shape, generator=gen, dtype=torch.int32))
        kc.copy_(torch.randn(kc.shape, generator=gen).to(kc))  # no poison now: every block may be owned
        vc.copy_(torch.randn(vc.shape, generator=gen).to(vc))
        q.copy_(torch.randn(q.shape, generator=gen).to(q))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_decode(q, kc, vc, tables, seq_lens, scale)
        assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]
        assert (out[0] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# varlen causal prefill


def reference_prefill(q, k, v, cu, scale, causal=True):
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    group = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs = q[a:b].double().transpose(0, 1)  # (heads, n, dim)
        ks = k[a:b].double().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[a:b].double().repeat_interleave(group, dim=1).transpose(0, 1)
        s = qs @ ks.transpose(1, 2) * scale
        n = b - a
        if causal:
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        out[a:b] = (torch.softmax(s, dim=-1) @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads,kv_heads", GQA, ids=["gqa1", "gqa4", "gqa7"])
@pytest.mark.parametrize("lens", [[1], [37, 1, 128, 129, 300, 64], [513, 2, 1000]], ids=["one", "ragged", "long"])
def test_varlen_prefill_matches_reference(kernels, dtype, heads, kv_heads, lens) -> None:
    skip_bf16_in_interpreter(dtype)
    if INTERPRET:
        lens = [min(n, 70) for n in lens]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, heads, kv_heads, lens)).encode()))
    dim = 128 if not INTERPRET else 32
    tokens = sum(lens)
    q = torch.randn(tokens, heads, dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(tokens, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(tokens, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    scale = dim**-0.5
    out = kernels.varlen_prefill(q, k, v, cu, max(lens), scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = relative_error(out, reference_prefill(q, k, v, cu, scale))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


def test_varlen_prefill_on_strided_qkv_views(kernels) -> None:
    """q, k, v cut from one fused QKV projection output (non-contiguous views), as the model passes them."""
    skip_bf16_in_interpreter(torch.bfloat16)
    gen = torch.Generator().manual_seed(11)
    heads, kv_heads, dim, lens = 28, 4, 128 if not INTERPRET else 32, [90, 3, 200]
    tokens = sum(lens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE, torch.bfloat16)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    cu = torch.tensor([0, 90, 93, 293], dtype=torch.int32, device=DEVICE)
    out = kernels.varlen_prefill(q, k, v, cu, 200, dim**-0.5)
    ref = reference_prefill(q, k, v, cu, dim**-0.5)
    assert relative_error(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("dim", [80, 64], ids=["dim80", "dim64"])
@pytest.mark.parametrize("lens", [[1], [64, 64, 16, 64, 37], [1025, 3, 256]], ids=["one", "windows", "images"])
def test_non_causal_varlen_matches_reference(kernels, dtype, dim, lens) -> None:
    """The vision towers' attention: each segment (an image, or a window) attends to all of itself; head dim 80
    (Qwen2-VL's and Qwen2.5-VL's towers) is padded to 128 in the kernel's registers."""
    skip_bf16_in_interpreter(dtype)
    if INTERPRET:
        lens = [min(n, 70) for n in lens]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, dim, lens)).encode()))
    heads, tokens = 16, sum(lens)
    # one fused QKV output cut into strided views, as the tower passes them
    qkv = torch.randn(tokens, 3, heads, dim, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    out = kernels.varlen_prefill(q, k, v, cu, max(lens), dim**-0.5, causal=False)
    assert out.shape == q.shape and torch.isfinite(out).all()
    err = relative_error(out, reference_prefill(q, k, v, cu, dim**-0.5, causal=False))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# the layer's elementwise pieces


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens,hidden", [(1, 3584), (37, 3584), (5, 1000)])
def test_fused_add_rmsnorm_matches_the_modules(kernels, dtype, tokens, hidden) -> None:
    skip_bf16_in_interpreter(dtype)
    gen = torch.Generator().manual_seed(tokens * hidden)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    # Qwen2's order: the residual sum in the activations' dtype, RMSNorm in float32, cast back, times the weight.
    total = x + residual
    t = total.float()
    expected = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * weight
    x_in, r_in = x.clone(), residual.clone()
    normed, new_residual = kernels.fused_add_rmsnorm(x_in, r_in, weight, 1e-6)
    assert normed.data_ptr() == x_in.data_ptr() and new_residual.data_ptr() == r_in.data_ptr()  # in place
    torch.testing.assert_close(new_residual, total, rtol=0, atol=0)
    torch.testing.assert_close(normed, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens,inter", [(1, 18944), (9, 3000)])
def test_silu_and_mul_matches_the_modules(kernels, dtype, tokens, inter) -> None:
    skip_bf16_in_interpreter(dtype)
    gen = torch.Generator().manual_seed(tokens + inter)
    gate_up = (2 * torch.randn(tokens, 2 * inter, generator=gen)).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(kernels.silu_and_mul(gate_up), expected)


# ---------------------------------------------------------------------------------------------------------------
# rotary embeddings and the cache write in one kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,tokens", [(28, 4, 128, 5), (4, 2, 64, 33), (2, 1, 16, 1)])
def test_rope_and_store_matches_the_modules(kernels, dtype, heads, kv_heads, dim, tokens) -> None:
    """The fused kernel against qwen2_text's rotate + store_kv: q and k turned in place, k and v in their slots,
    nothing else in the cache touched. bf16 bit for bit (the same roundings); float32 to its last bits (the
    kernel may fuse a product into the sum)."""
    from epd.workers.engine.attention import store_kv
    from epd.workers.engine.qwen2_text import MRoPE, rotate

    skip_bf16_in_interpreter(dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{heads}{dim}{tokens}".encode()))
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=gen).to(DEVICE, dtype)
    section = [dim // 8, dim // 8 * 3 // 2, dim // 2 - dim // 8 - dim // 8 * 3 // 2]
    rope = MRoPE(dim, 1e6, section, torch.device(DEVICE))
    positions = torch.randint(0, 4000, (3, tokens), generator=gen).to(DEVICE)
    cos, sin = rope.cos_sin(positions, dtype)
    caches = [torch.randn(9, 16, kv_heads, dim, generator=gen).to(DEVICE, dtype) for _ in range(2)]
    slots = torch.randperm(9 * 16, generator=gen)[:tokens].to(DEVICE)
    want_qk = rotate(qkv[:, : heads + kv_heads], cos, sin)
    want_caches = [c.clone() for c in caches]
    store_kv(*want_caches, want_qk[:, heads:], qkv[:, heads + kv_heads :], slots)
    got = qkv.clone()
    kernels.rope_and_store(got, cos, sin, heads, kv_heads, *caches, slots)
    same = torch.equal if dtype != torch.float32 else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert same(got[:, : heads + kv_heads], want_qk)
    assert torch.equal(got[:, heads + kv_heads :], qkv[:, heads + kv_heads :])
    assert same(caches[0], want_caches[0]) and torch.equal(caches[1], want_caches[1])
    alone = qkv.clone()
    kernels.rope_and_store(alone, cos, sin, heads, kv_heads)  # no cache: the rotation alone
    assert torch.equal(alone, got)
