"""CPU the serving benchmark's client spends a streamed chunk: httpx's streaming against bench/serve.py's `Client`,
on one `epd` cluster streaming 16 answers of 200 tokens at once, measured as the client's `time.process_time()`.

    .venv/bin/python bench/stream_client_cost.py [--rounds 2]

The model is tools/random_checkpoint.py's small checkpoint (its 152,064-word vocabulary: every token is a word).
Prints the figures and writes bench/results/stream_client_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # noqa: E402
from epd.ops.up import Cluster  # noqa: E402
from epd.tools.random_checkpoint import build  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "stream_client_cost.json"


async def with_httpx(base_url: str, bodies: list[dict]) -> int:
    """Chunks read through httpx's streaming, each parsed as serve.py parses it."""
    chunks = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

        async def one(body: dict) -> None:
            nonlocal chunks
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        json.loads(line[6:])
                        chunks += 1

        await asyncio.gather(*(one(b) for b in bodies))
    return chunks


async def with_client(base_url: str, bodies: list[dict]) -> int:
    """Content chunks read through serve.Client (its own HTTP/1.1 on asyncio streams)."""
    async with serve.Client(base_url, 600) as client:
        results = await asyncio.gather(*(client.send(b) for b in bodies))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return sum(len(r.itl) + 1 for r in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp) / "small", small=True)
        cluster = Cluster.local(model, Path(tmp) / "cluster", "epd", kv_cache_mb=256, max_inflight=4096)
        try:
            argv = ["--model", cluster.settings.model_name, "--tokenizer", str(model), "--workload", "text"]
            prompts = serve.Prompts(serve.parse_args([*argv, "--input-len", "16", "--output-len", "200"]))
            bodies = [prompts.body() for _ in range(16)]
            for _ in range(args.rounds):
                for name, read in (("httpx", with_httpx), ("serve.Client", with_client)):
                    cpu, wall = time.process_time(), time.perf_counter()
                    chunks = asyncio.run(read(cluster.base_url, bodies))
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                    rows.append(
                        {"client": name, "chunks": chunks, "cpu_us_per_chunk": 1e6 * cpu / chunks, "wall_s": wall}
                    )
                    print(
                        f"{name:<13} {chunks} chunks, client CPU {1e6 * cpu / chunks:.0f} us a chunk, wall {wall:.1f} s"
                    )
        finally:
            cluster.stop()
    machine = f"{platform.machine()}, {os.cpu_count()} vCPU"
    args.out.write_text(json.dumps({"date": time.strftime("%Y%m%d-%H%M%S"), "machine": machine, "rows": rows}) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
