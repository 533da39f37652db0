"""Throughput with tracing on versus off, on one machine, in one run.

Two identical `e-p-d` clusters run side by side (same model, own NATS and Mooncake), one with
tracing to JSON-lines files (as `epd up` does), one with `EPD_TRACING=off`. Rounds alternate
between them so that drift on the machine hits both alike; each round sends the same requests
(half text-only, half with an image that is cached after its first use) at a fixed concurrency.

    .venv/bin/python bench/tracing_overhead.py [--rounds 8] [--requests 48] [--concurrency 4] [--hidden 64 --layers 2]

The default model is the tests' tiny one (a few ms of compute per request: the worst case for any
fixed per-request cost); `--hidden 512 --layers 8` is a larger random one of the same architecture.
Prints the figures and writes them to bench/results/tracing_overhead-<hidden>x<layers>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from epd.ops.up import Cluster
from epd.tools.tiny_model import build_tiny_qwen2_vl
from PIL import Image, ImageDraw


def image_url() -> str:
    img = Image.new("RGB", (96, 96), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((16, 16, 80, 80), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bodies(n: int, max_tokens: int) -> list[dict]:
    url = image_url()
    out = []
    for i in range(n):
        content: list[dict] = [{"type": "text", "text": f"Question number {i}: what is it?"}]
        if i % 2:
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        out.append(
            {
                "model": "tiny-qwen2-vl",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        )
    return out


async def round_(base_url: str, reqs: list[dict], concurrency: int) -> tuple[float, int]:
    """(seconds for all requests, completion tokens)."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as c:
            while not queue.empty():
                r = await c.post("/v1/chat/completions", json=queue.get_nowait())
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, tokens


def start(model: Path, workdir: Path, tracing: bool) -> Cluster:
    trace_dir = str(workdir / "traces") if tracing else ""
    return Cluster.local(
        model, workdir, gateway_timeout_s=300, tracing=tracing, mooncake_segment_mb=64, trace_dir=trace_dir
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64, help="model width (the tests' tiny model: 64)")
    ap.add_argument("--layers", type=int, default=2, help="language and vision layers (tiny: 2)")
    ap.add_argument("--out", type=Path, help="default bench/results/tracing_overhead-<hidden>x<layers>.json")
    args = ap.parse_args()
    args.out = args.out or Path(f"bench/results/tracing_overhead-{args.hidden}x{args.layers}.json")
    tmp = Path(tempfile.mkdtemp(prefix="epd-bench-"))
    model = build_tiny_qwen2_vl(tmp / "tiny-qwen2-vl", hidden=args.hidden, layers=args.layers)
    clusters = {"on": start(model, tmp / "on", True), "off": start(model, tmp / "off", False)}
    reqs = bodies(args.requests, args.max_tokens)
    rps: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for c in clusters.values():  # warm-up: caches, allocators, first-request costs
            await round_(c.base_url, reqs[:8], args.concurrency)
        for i in range(args.rounds):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for name in order:
                secs, toks = await round_(clusters[name].base_url, reqs, args.concurrency)
                rps[name].append(len(reqs) / secs)
                print(
                    f"round {i + 1} tracing {name:>3}: {len(reqs) / secs:6.2f} req/s  {toks / secs:7.1f} tok/s",
                    flush=True,
                )
    finally:
        for c in clusters.values():
            c.stop()
    on, off = statistics.median(rps["on"]), statistics.median(rps["off"])
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores",
        "command": "python bench/tracing_overhead.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "rounds": rps,
        "median_rps_tracing_on": round(on, 3),
        "median_rps_tracing_off": round(off, 3),
        "throughput_cost_pct": round(100 * (off - on) / off, 2),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
