"""JetStream benchmark: publish-to-fetch latency and throughput of epd-sized jobs, one node (R1) against a
3-node cluster (R3), measured in one run.

Run: `.venv/bin/python bench/jetstream.py` (its own nats-servers on loopback; writes
`bench/results/jetstream.json`).

- The stream is what a stage's is: work queue, file storage, a durable pull consumer, acks.
- Message sizes: our stage jobs are a few KB (an EncodeJob or PrefillJob with its handles, a KVReady with a KV
  handle); 1, 4 and 16 KiB.
- Latency: one job at a time; from `publish` (which returns when the stream has stored it: on R3, when two of
  three nodes have) until a `fetch` on another connection returns it, then its ack. p50 and p99.
- Each measured `--repeat` times, the targets interleaved; medians reported.
- Throughput: `--count` jobs published with up to 64 in flight while a consumer fetches batches of 64 and acks
  each; jobs per second end to end (the last ack).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats
from epd.ops.infra import NatsServer
from epd.ops.nats_cluster import NatsCluster
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

OUT = Path(__file__).resolve().parent / "results" / "jetstream.json"
SIZES = (1024, 4096, 16384)
IN_FLIGHT = 64


async def _stream(js: nats.js.JetStreamContext, name: str, replicas: int) -> None:
    cfg = StreamConfig(
        name=name,
        subjects=[f"{name}.job"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
    )
    await js.add_stream(cfg)


async def measure(servers: list[str], replicas: int, size: int, samples: int, count: int, rep: int) -> dict:
    pub = await nats.connect(servers, name="bench-pub")
    sub = await nats.connect(servers, name="bench-sub")
    name = f"BENCH_R{replicas}_{size}_{rep}"
    try:
        js, jsub = pub.jetstream(), sub.jetstream()
        await _stream(js, name, replicas)
        consumer = await jsub.pull_subscribe(
            f"{name}.job", durable="bench", config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1)
        )
        payload = os.urandom(size)
        for _ in range(20):  # warm up: connections, leaders, the consumer
            await js.publish(f"{name}.job", payload)
            for m in await consumer.fetch(1, timeout=5):
                await m.ack()
        latencies = []
        for _ in range(samples):
            t0 = time.perf_counter()
            await js.publish(f"{name}.job", payload)
            [m] = await consumer.fetch(1, timeout=5)
            latencies.append(time.perf_counter() - t0)
            await m.ack()

        async def publish_all() -> None:
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def one() -> None:
                async with gate:
                    await js.publish(f"{name}.job", payload)

            await asyncio.gather(*(one() for _ in range(count)))

        async def consume_all() -> None:
            got = 0
            while got < count:
                try:
                    batch = await consumer.fetch(IN_FLIGHT, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for m in batch:
                    await m.ack()
                got += len(batch)

        t0 = time.perf_counter()
        await asyncio.gather(publish_all(), consume_all())
        elapsed = time.perf_counter() - t0
        latencies.sort()
        return {
            "replicas": replicas,
            "bytes": size,
            "latency_p50_ms": round(statistics.median(latencies) * 1e3, 3),
            "latency_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 3),
            "jobs_per_s": round(count / elapsed),
            "mb_per_s": round(count * size / elapsed / 1e6, 2),
        }
    finally:
        await pub.close()
        await sub.close()


def median_row(runs: list[dict]) -> dict:
    """Each figure's median over the repeats (a shared machine's noise), with the spread of the throughput."""
    row = dict(runs[0])
    for key in ("latency_p50_ms", "latency_p99_ms", "jobs_per_s", "mb_per_s"):
        row[key] = statistics.median(r[key] for r in runs)
    row["jobs_per_s_range"] = [min(r["jobs_per_s"] for r in runs), max(r["jobs_per_s"] for r in runs)]
    return row


async def run(samples: int, count: int, repeat: int, workdir: Path) -> list[dict]:
    one = NatsServer(workdir / "single").start()
    cluster = NatsCluster(workdir / "cluster", 3).start()
    try:
        rows = []
        for size in SIZES:
            runs: dict[str, list[dict]] = {"1 node": [], "3 nodes": []}
            for rep in range(repeat):  # interleaved: both targets see the same moments of the machine
                runs["1 node"].append(await measure([one.url], 1, size, samples, count, rep))
                runs["3 nodes"].append(await measure(cluster.url.split(","), 3, size, samples, count, rep))
            rows += [median_row(r) | {"target": target} for target, r in runs.items()]
        return rows
    finally:
        one.stop()
        cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=500, help="latency samples per size and target")
    ap.add_argument("--count", type=int, default=5000, help="jobs per throughput run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the medians are reported")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="epd-bench-js-") as tmp:
        rows = asyncio.run(run(args.samples, args.count, args.repeat, Path(tmp)))
    print(f"{'target':8} {'R':>2} {'bytes':>6} {'p50 ms':>8} {'p99 ms':>8} {'jobs/s':>8} {'MB/s':>7}")
    for r in rows:
        print(
            f"{r['target']:8} {r['replicas']:>2} {r['bytes']:>6} {r['latency_p50_ms']:>8} {r['latency_p99_ms']:>8}"
            f" {r['jobs_per_s']:>8} {r['mb_per_s']:>7}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "cpus": os.cpu_count(), "argv": sys.argv[1:]}
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
