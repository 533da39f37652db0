"""Text-only TTFT with the encoders flooded by image requests, in e-p-d and beside it in epd.

For each topology, one cluster (own NATS and Mooncake) serves, in this order:

1. unloaded: `--requests` text-only requests, one at a time;
2. loaded: the same, while `--flood` clients keep sending image requests, each a new picture
   (never in the encoder cache), so that the encoders always have a queue;
3. (e-p-d only) image requests one at a time: a new picture each, then one picture repeated
   (its embedding in the encoder cache after the first).

TTFT is the latency of a request with `max_tokens` 1, measured by the client: HTTP in, routing,
queues, encode (for images), prefill, first token out. The flood's encode queue is sampled while
the loaded text requests run, to show that the encoders were saturated.

    .venv/bin/python bench/ttft_isolation.py [--requests 100] [--flood 8] [--model DIR]

The default model is the demo checkpoint that ships with the project. Prints the figures and writes
them to bench/results/ttft_isolation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from epd.ops.status_view import gather_status
from epd.ops.up import Cluster
from epd.tools import shapes
from epd.tools.demo_model import SHIPPED


def picture_url(rng: random.Random) -> str:
    buf = io.BytesIO()
    shapes.draw(rng, size=(rng.randint(256, 512), rng.randint(256, 512))).image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(model: str, text: str, image: str | None = None) -> dict:
    content: list[dict] = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0}


async def ttft(client: httpx.AsyncClient, req: dict) -> float:
    started = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=req)
    r.raise_for_status()
    return time.perf_counter() - started


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(1e3 * statistics.median(ordered), 1),
        "p99_ms": round(1e3 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 1),
        "mean_ms": round(1e3 * statistics.fmean(ordered), 1),
    }


async def text_run(client: httpx.AsyncClient, model: str, n: int) -> list[float]:
    return [await ttft(client, body(model, f"Say something, number {i}.")) for i in range(n)]


async def measure(topology: str, model: Path, args: argparse.Namespace, workdir: Path) -> dict:
    cluster = Cluster.local(model, workdir, topology, mooncake_segment_mb=64)
    name, rng = cluster.settings.model_name, random.Random(7)
    try:
        async with httpx.AsyncClient(base_url=cluster.base_url, timeout=300) as client:
            await text_run(client, name, 10)  # warm up
            await ttft(client, body(name, "Warm up.", picture_url(rng)))
            out: dict = {"unloaded": summary(await text_run(client, name, args.requests))}

            stop, flooded = asyncio.Event(), [0]
            urls = [picture_url(rng) for _ in range(64)]

            async def flood(k: int) -> None:
                i = k
                while not stop.is_set():  # every image new to the cache: a salt in the question changes nothing
                    url = urls[i % len(urls)] if i < len(urls) else picture_url(rng)
                    await ttft(client, body(name, "What color is the shape?", url))
                    flooded[0] += 1
                    i += args.flood

            clients = [asyncio.create_task(flood(k)) for k in range(args.flood)]
            await asyncio.sleep(3.0)  # the flood builds its queue
            depths: list[int] = []

            async def sample_queue() -> None:
                while not stop.is_set():
                    _, queues = await gather_status(cluster.settings.nats_url)
                    stage = "encode" if "encode" in queues and topology != "epd" else "prefill"
                    depths.append(queues.get(stage, {}).get("waiting", 0))
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample_queue())
            started, before = time.perf_counter(), flooded[0]
            out["loaded"] = summary(await text_run(client, name, args.requests))
            out["flood_images_per_s"] = round((flooded[0] - before) / (time.perf_counter() - started), 2)
            stop.set()
            await asyncio.gather(*clients, sampler)
            out["flood_queue_waiting_mean"] = round(statistics.fmean(depths), 1) if depths else 0.0
            out["flood_queue_waiting_min"] = min(depths) if depths else 0
            out["p99_loaded_over_unloaded"] = round(out["loaded"]["p99_ms"] / out["unloaded"]["p99_ms"], 2)

            if topology != "epd":
                new = [await ttft(client, body(name, "What shape is it?", picture_url(rng))) for _ in range(20)]
                same = picture_url(rng)
                await ttft(client, body(name, "What shape is it?", same))
                repeated = [await ttft(client, body(name, "What shape is it?", same)) for _ in range(20)]
                out["image_new"], out["image_repeated"] = summary(new), summary(repeated)
        return out
    finally:
        cluster.stop()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100, help="text-only requests per phase")
    p.add_argument("--flood", type=int, default=8, help="concurrent image clients")
    p.add_argument("--model", type=Path, default=SHIPPED)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ttft_isolation.json")
    args = p.parse_args()
    results = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} vCPU", "model": str(args.model.name)}
    results["args"] = {"requests": args.requests, "flood": args.flood}
    with tempfile.TemporaryDirectory() as tmp:
        for topology in ("e-p-d", "epd"):
            results[topology] = await measure(topology, args.model, args, Path(tmp) / topology)
            print(topology, json.dumps(results[topology], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
