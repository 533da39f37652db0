"""Where a decode step's time goes on a GPU: the kernels of one CUDA-graph replay, at several batch sizes.

For each batch size: the Qwen2.5-VL-7B-shaped model (random weights, bf16) replays one decode step's graph
over sequences of `--context` cached tokens under torch.profiler; prints the kernels launched per step and the
top kernels by total device time, beside the event-timed replay and the weight-read bound. The step's host
work is what `bench/engine_gpu.py` measures on top (its step against this replay).

    python3 bench/step_profile_gpu.py [--batch 1 32 64] [--context 576] [--out bench/results/step_profile_gpu.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
OUT = Path(__file__).resolve().parent / "results" / "step_profile_gpu.json"


def profile_batch(family: Any, batch: int, context: int, top: int) -> dict[str, Any]:
    from epd.workers.engine.cuda_graphs import GraphedSteps
    from epd.workers.engine.kv_cache import PagedKVCache
    from torch.profiler import ProfilerActivity, profile

    bytes_needed = batch * (context + 32) * family.kv_layout().bytes_per_token()
    cache = PagedKVCache(family.kv_layout(), bytes_needed + 64 * 2**20)
    steps = GraphedSteps(family, cache, batch)
    tables = [cache.reserve(context + 1) for _ in range(batch)]
    steps.step([1] * batch, [context] * batch, tables, [context] * batch)
    graph = next(iter(steps.graphs.values())).graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(30):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    replays = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter[str] = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time / replays
            count[e.name] += 1
    kernels = sum(count.values()) / replays
    rows = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return {
        "batch": batch,
        "context": context,
        "replay_ms": statistics.median(times),
        "kernels_per_step": kernels,
        "kernel_time_ms": sum(total.values()) / 1e3,
        "top": [{"kernel": n[:110], "us_per_step": t, "launches_per_step": count[n] / replays} for n, t in rows],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 64])
    p.add_argument("--context", type=int, default=576)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    from engine_gpu import bandwidth
    from epd.tools.random_checkpoint import qwen2_5_vl_7b_config
    from epd.workers.engine.checkpoint import Checkpoint
    from epd.workers.engine.qwen2_5_vl import Qwen25VL
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    config = qwen2_5_vl_7b_config()
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).eval()
    ckpt = Checkpoint(Path("."), config, None, Qwen2VLImageProcessorPil(), "")
    family = Qwen25VL(ckpt, device="cuda", dtype="bfloat16", model=model)
    text_bytes = sum(w.numel() * w.element_size() for n, w in family.text.named_parameters() if "embed" not in n)
    bound_ms = text_bytes / bandwidth() * 1e3
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "weight_bound_ms": bound_ms}
    results["batches"] = []
    for b in args.batch:
        r = profile_batch(family, b, args.context, args.top)
        results["batches"].append(r)
        print(
            f"batch {b}: replay {r['replay_ms']:.3f} ms ({r['replay_ms'] / bound_ms:.2f}x the weight bound "
            f"{bound_ms:.2f} ms), {r['kernels_per_step']:.0f} kernels, {r['kernel_time_ms']:.3f} ms in kernels",
            flush=True,
        )
        for row in r["top"]:
            print(f"  {row['us_per_step']:8.1f} us {row['launches_per_step']:5.0f}x  {row['kernel']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
