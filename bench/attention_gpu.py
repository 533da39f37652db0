"""The Triton attention kernels at Qwen2.5-VL-7B's shape (28 heads, 4 KV heads, head_dim 128, bf16) on a GPU.

- copy bandwidth: a large device-to-device copy (bytes read plus written, over the time): the ceiling;
- decode: `paged_decode` over a paged cache of 28 layers (each layer its own cache, so nothing stays in L2),
  captured in one CUDA graph of 28 calls as a model step would run it, timed per layer; the bytes it must read
  (each sequence's keys and values once) over that time. Beside it, in the same graph form: the old path
  (gather each sequence's blocks into a padded tensor, then masked SDPA with the KV heads shared), and SDPA on
  KV already contiguous (no gather). Kernel variants (partition, tile, warps) are swept; the default is marked.
- prefill: `varlen_prefill` on 8 x 1,024 tokens against SDPA's flash backend on the same sequences (keys
  repeated to 28 heads beforehand, outside the timing), in TFLOP/s of causal attention.

    python3 bench/attention_gpu.py [--out bench/results/attention_gpu.json] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent / "results" / "attention_gpu.json"
HEADS, KV_HEADS, DIM, LAYERS, BLOCK = 28, 4, 128, 28, 16
DTYPE = torch.bfloat16


def load_kernels() -> Any:
    try:
        import epd.workers.engine.triton_attention as module  # noqa: PLC0415
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parents[1] / "workers" / "engine" / "triton_attention.py"
        spec = importlib.util.spec_from_file_location("triton_attention", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def bench_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds a call (CUDA events; triton's do_bench flushes L2 between calls)."""
    import triton.testing  # noqa: PLC0415

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` captured in a CUDA graph: its replay (launch gaps as a model step's graph would have them)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


class DecodeCase:
    """`LAYERS` separate caches, each holding every sequence's blocks in a shuffled order."""

    def __init__(self, batch: int, lens: list[int], gen: torch.Generator) -> None:
        self.batch, self.lens = batch, lens
        blocks_per = [math.ceil(n / BLOCK) for n in lens]
        num_blocks = sum(blocks_per) + 1
        width = 1 << (max(blocks_per) - 1).bit_length()  # the graph bucket's width: the next power of two
        self.k = [torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, device="cuda", dtype=DTYPE) for _ in range(LAYERS)]
        self.v = [torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, device="cuda", dtype=DTYPE) for _ in range(LAYERS)]
        order = torch.randperm(num_blocks - 1, generator=gen) + 1
        tables = torch.zeros(batch, width, dtype=torch.int32)
        at = 0
        for b, n in enumerate(blocks_per):
            tables[b, :n] = order[at : at + n].to(torch.int32)
            at += n
        self.tables = tables.cuda()
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        self.q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=DTYPE)
        self.scale = DIM**-0.5
        # KV bytes a layer must read: each sequence's keys and values once; plus q in and the output out.
        self.bytes = 2 * sum(lens) * KV_HEADS * DIM * 2 + 2 * self.q.numel() * 2

    def kernel_step(self, fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            for layer in range(LAYERS):
                fn(self.q, self.k[layer], self.v[layer], self.tables, self.seq_lens, self.scale)

        return step

    def gather_sdpa_step(self) -> Callable[[], None]:
        """The path issue 14 replaces: gather blocks into a padded tensor, masked SDPA, KV heads shared."""
        width = self.tables.shape[1] * BLOCK
        visible = torch.arange(width, device="cuda")[None, :] < self.seq_lens[:, None]
        mask = visible[:, None, None, :]  # (batch, 1, 1, width)
        q = self.q[:, :, None, :]

        def step() -> None:
            for layer in range(LAYERS):
                k = self.k[layer][self.tables].view(self.batch, width, KV_HEADS, DIM).transpose(1, 2)
                v = self.v[layer][self.tables].view(self.batch, width, KV_HEADS, DIM).transpose(1, 2)
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)

        return step

    def dense_sdpa_step(self) -> Callable[[], None]:
        """SDPA on KV already laid out contiguous and padded (no gather): what torch does with no paging."""
        width = self.tables.shape[1] * BLOCK
        kd = [
            self.k[i][self.tables].view(self.batch, width, KV_HEADS, DIM).transpose(1, 2).contiguous()
            for i in range(LAYERS)
        ]
        vd = [
            self.v[i][self.tables].view(self.batch, width, KV_HEADS, DIM).transpose(1, 2).contiguous()
            for i in range(LAYERS)
        ]
        visible = torch.arange(width, device="cuda")[None, :] < self.seq_lens[:, None]
        mask = visible[:, None, None, :]
        q = self.q[:, :, None, :]

        def step() -> None:
            for layer in range(LAYERS):
                F.scaled_dot_product_attention(
                    q, kd[layer], vd[layer], attn_mask=mask, scale=self.scale, enable_gqa=True
                )

        return step


def decode(kernels: Any, bandwidth: float, quick: bool) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    cases = {
        "batch 64, ~600 tokens": (64, torch.randint(560, 641, (64,), generator=gen).tolist()),
        "batch 32, ~600 tokens": (32, torch.randint(560, 641, (32,), generator=gen).tolist()),
        "batch 8, ~600 tokens": (8, torch.randint(560, 641, (8,), generator=gen).tolist()),
        "batch 1, 640 tokens": (1, [640]),
    }
    variants: dict[str, dict[str, Any]] = {
        "default": {},
        "no split": {"partition": 0},
        "seq default": {"per_sequence": True},
        "seq no split": {"per_sequence": True, "partition": 0},
    }
    if not quick:
        variants |= {
            "partition 64": {"partition": 64},
            "partition 128": {"partition": 128},
            "partition 256": {"partition": 256},
            "partition 512": {"partition": 512},
            "block_n 128": {"block_n": 128},
            "stages 3": {"num_stages": 3},
            "seq partition 64": {"per_sequence": True, "partition": 64},
            "seq partition 128": {"per_sequence": True, "partition": 128},
            "seq partition 256": {"per_sequence": True, "partition": 256},
            "seq block_n 16": {"per_sequence": True, "block_n": 16},
            "seq block_n 64": {"per_sequence": True, "block_n": 64},
            "seq warps 4": {"per_sequence": True, "num_warps": 4},
            "seq stages 3": {"per_sequence": True, "num_stages": 3},
        }
    rows = []
    for name, (batch, lens) in cases.items():
        case = DecodeCase(batch, lens, gen)
        print(f"decode {name}: {case.bytes / 1e6:.1f} MB of KV a layer", flush=True)

        def record(label: str, step: Callable[[], None], case: DecodeCase = case, name: str = name) -> None:
            try:
                us = bench_ms(graphed(step)) * 1e3 / LAYERS
            except Exception as exc:  # a variant that fails to compile or capture is reported, not fatal
                print(f"  {label:<24} failed: {type(exc).__name__}: {exc}", flush=True)
                rows.append({"case": name, "variant": label, "error": repr(exc)})
                return
            gbps = case.bytes / (us * 1e-6) / 1e9
            rows.append(
                {"case": name, "variant": label, "us_per_layer": us, "GBps": gbps, "of_copy_bw": gbps / bandwidth}
            )
            print(
                f"  {label:<24} {us:8.2f} us/layer {gbps:8.0f} GB/s {100 * gbps / bandwidth:5.1f}% of copy", flush=True
            )

        for label, knobs in variants.items():
            fn = lambda *a, knobs=knobs: kernels._paged_decode(*a, **knobs)  # noqa: E731
            record(f"triton {label}", case.kernel_step(fn))
        record("gather + SDPA", case.gather_sdpa_step())
        record("SDPA, dense KV", case.dense_sdpa_step())
        del case
        torch.cuda.empty_cache()
    return rows


def prefill(kernels: Any, quick: bool) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    seqs, n = 8, 1024
    tokens = seqs * n
    q = torch.randn(tokens, HEADS, DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(tokens, KV_HEADS, DIM, device="cuda", dtype=DTYPE)
    v = torch.randn(tokens, KV_HEADS, DIM, device="cuda", dtype=DTYPE)
    cu = torch.arange(0, tokens + 1, n, device="cuda", dtype=torch.int32)
    scale = DIM**-0.5
    flops = 4 * seqs * HEADS * DIM * n * (n + 1) / 2  # two products over the causal half
    rows = []
    print(f"prefill {seqs} x {n} tokens: {flops / 1e9:.1f} GFLOP", flush=True)

    def record(label: str, fn: Callable[[], Any]) -> None:
        try:
            ms = bench_ms(fn)
        except Exception as exc:
            print(f"  {label:<34} failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"case": "prefill 8 x 1024", "variant": label, "error": repr(exc)})
            return
        tflops = flops / (ms * 1e-3) / 1e12
        rows.append(
            {
                "case": "prefill 8 x 1024",
                "variant": label,
                "us": ms * 1e3,
                "TFLOPs": tflops,
                "tokens_per_s": tokens / (ms * 1e-3),
            }
        )
        print(f"  {label:<34} {ms * 1e3:8.1f} us {tflops:7.1f} TFLOP/s", flush=True)

    record("triton varlen default", lambda: kernels.varlen_prefill(q, k, v, cu, n, scale))
    if not quick:
        for bm, bn, warps, stages in [
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (64, 64, 4, 4),
            (64, 32, 4, 3),
            (64, 64, 8, 3),
            (64, 128, 4, 3),
        ]:
            record(
                f"triton varlen m{bm} n{bn} w{warps} s{stages}",
                lambda bm=bm, bn=bn, warps=warps, stages=stages: kernels._varlen_prefill(
                    q, k, v, cu, n, scale, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages
                ),
            )
    qb = q.view(seqs, n, HEADS, DIM).transpose(1, 2)
    kb = k.view(seqs, n, KV_HEADS, DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, dim=1)
    vb = v.view(seqs, n, KV_HEADS, DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, dim=1)
    qc, kc, vc = qb.contiguous(), kb.contiguous(), vb.contiguous()

    def flash() -> None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)

    def cudnn() -> None:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)

    record("SDPA flash (heads repeated)", flash)
    record("SDPA cuDNN (heads repeated)", cudnn)
    ref = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)
    out = kernels.varlen_prefill(q, k, v, cu, n, scale).view(seqs, n, HEADS, DIM).transpose(1, 2)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"  varlen vs SDPA flash: relative difference {err:.2e}", flush=True)
    rows.append({"case": "prefill 8 x 1024", "variant": "check", "relative_difference_vs_sdpa": err})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="the default kernels and baselines only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    import triton  # noqa: PLC0415

    kernels = load_kernels()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows = decode(kernels, bandwidth, args.quick) + prefill(kernels, args.quick)
    result = {
        "command": "python3 bench/attention_gpu.py" + (" --quick" if args.quick else ""),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "copy_GBps": bandwidth,
        "shape": {
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": DIM,
            "block_tokens": BLOCK,
            "layers": LAYERS,
            "dtype": str(DTYPE),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    best = {}
    for row in rows:
        if "us_per_layer" in row and row["variant"].startswith("triton"):
            if row["case"] not in best or row["us_per_layer"] < best[row["case"]]["us_per_layer"]:
                best[row["case"]] = row
    print("\nbest decode variant per case:")
    for case, row in best.items():
        print(f"  {case:<24} {row['variant']:<24} {row['us_per_layer']:7.2f} us {100 * row['of_copy_bw']:5.1f}%")
    print(
        f"median triton decode share of copy bandwidth: "
        f"{statistics.median(r['of_copy_bw'] for r in best.values()):.2f}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
