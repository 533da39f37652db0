"""The whole system on one GPU: epd, e-pd and e-p-d under the same multimodal loads (issue 21).

For each topology, one `epd up` cluster (its own NATS server, Mooncake master, gateway and workers, every
worker on the same GPU) serves, in this order:

1. a warm-up burst, not counted (Triton's compiles and the decode graphs' first captures happen here);
2. `bench/serve.py`'s random-mm workload over a sweep of Poisson rates, then its text workload;
3. text-only TTFT, one request at a time, alone and then while `--flood` clients keep sending new images;
4. TTFT of a new picture against the same picture again (its embedding already in the encoder cache);
5. the pipeline's own cost at low load, per hop, from the spans (`bench/pipeline_cost.py`).

    python bench/serve_gpu.py --model-dir /tmp/qwen2.5-vl-7b-random      # builds the checkpoint if missing

`--engine vllm` runs the same clusters with vLLM as the pd and epd workers' engine (workers/vllm_engine.py).
`--server CMD --server-url URL` also runs steps 1-4 against any OpenAI-compatible server that CMD starts (vLLM's
own `vllm serve`, for one), after the clusters: the same loads, side by side.

The checkpoint is `tools/random_checkpoint.py`'s Qwen2.5-VL-7B shape in bf16. Prints each step's figures as it
goes and a table at the end, and writes bench/results/serve_gpu.json (every run in `vllm bench serve`'s field
names) and serve_gpu.png.
`--device cpu --small` runs the same steps on a small checkpoint: a check that the script works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import queue
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # noqa: E402 - bench/serve.py, beside this script

if TYPE_CHECKING:
    from epd.ops.up import Cluster

RESULTS = Path(__file__).resolve().parent / "results"


def cluster_settings(args: argparse.Namespace) -> dict:
    """The settings every worker of every topology runs with: the GPU, bf16, room for 64 long sequences."""
    return {
        "device": args.device,
        "dtype": args.dtype,
        "kv_cache_mb": args.kv_cache_mb,
        "kv_buffer_mb": args.kv_buffer_mb,
        "mooncake_segment_mb": args.segment_mb,
        "max_seqs": 64,
        "max_batch": 8,
        "max_inflight": 4096,
        "request_timeout_s": 600.0,
        "engine": args.engine,
    }


@dataclass
class Target:
    """What the loads are sent to: an OpenAI-compatible endpoint, its served model, and the processes behind it
    (their CPU is measured); `cluster` where it is an epd cluster (its metrics and spans are read too)."""

    label: str
    base_url: str
    model: str
    pids: dict[str, int]
    cluster: Cluster | None = None


def bench_args(
    args: argparse.Namespace, target: Target, workload: str, rates: list[float], n: int
) -> argparse.Namespace:
    """bench/serve.py's arguments for one workload against `target`."""
    argv = ["--base-url", target.base_url, "--model", target.model, "--tokenizer", str(args.model_dir)]
    argv += ["--workload", workload, "--num-prompts", str(n), "--request-rate", *map(str, rates)]
    argv += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    argv += ["--image-size", str(args.image_size), "--max-images", str(args.max_images)]
    argv += ["--label", target.label, "--goodput", *args.goodput, "--seed", str(args.seed)]
    return serve.parse_args(argv)


def ttft_stats(results: list[serve.Result]) -> dict:
    ok = [r.ttft for r in results if r.ok]
    if not ok:
        return {"n": 0, "failed": len(results), "errors": [r.error for r in results][:3]}
    ms = serve.percentiles("ttft", ok, [99])  # (nearest rank, as the load's own figures)
    n = {"n": len(ok), "failed": len(results) - len(ok)}
    return n | {"median_ms": ms["median_ttft_ms"], "p99_ms": ms["p99_ttft_ms"]}


def probe_prompts(args: argparse.Namespace, target: Target) -> serve.Prompts:
    """The probes' prompts: `--input-len` tokens of the model's vocabulary, as the loads'."""
    return prompts_for(target.model, str(args.model_dir), args.input_len)


def prompts_for(model: str, tokenizer: str, input_len: int) -> serve.Prompts:
    return serve.Prompts(serve.parse_args(["--model", model, "--tokenizer", tokenizer, "--input-len", str(input_len)]))


async def one_at_a_time(client: serve.Client, bodies: list[dict]) -> list[serve.Result]:
    return [await client.send(body) for body in bodies]


async def flood_test(args: argparse.Namespace, target: Target) -> dict:
    """Text-only TTFT, one request at a time, unloaded and then under `--flood` clients of new pictures. On an epd
    cluster, the slowest flooded text requests' TTFT is also split per hop from the spans (where they waited).

    The flood runs in a process of its own: drawing its pictures (a 640x640 noise PNG takes 6-18 ms) and
    encoding its bodies of megabytes would hold the event loop that times the probes."""
    prompts = probe_prompts(args, target)
    text = [prompts.request([], 8) for _ in range(args.probe)]
    mp = multiprocessing.get_context("spawn")
    running, stop, results = mp.Event(), mp.Event(), mp.Queue()
    flood_args = (target.base_url, target.model, str(args.model_dir), args.input_len, args.image_size)
    flood_args += (args.max_images, args.flood, args.seed + 7)
    flood = mp.Process(target=flood_clients, args=(*flood_args, running, stop, results), daemon=True)
    async with serve.Client(target.base_url, 600) as client:
        alone = await one_at_a_time(client, text)
        flood.start()
        try:
            if not await asyncio.to_thread(running.wait, 120):
                raise RuntimeError("the flood's process did not start within 120 s")
            await asyncio.sleep(args.flood_ramp_s)  # the encoders' queue fills before the probes start
            spans = cost_module().SpanTail(Path(target.cluster.settings.trace_dir)) if target.cluster else None
            scraped = await scrape(target.cluster)
            loaded = await one_at_a_time(client, text)
            lag = loop_lag(scraped, await scrape(target.cluster))
        finally:
            stop.set()
            flooded = await asyncio.to_thread(collect, flood, results)
    out = {"unloaded": ttft_stats(alone), "flooded": ttft_stats(loaded), "flood": ttft_stats(flooded)}
    if out["unloaded"]["n"] and out["flooded"]["n"]:
        out["p99_ratio"] = out["flooded"]["p99_ms"] / out["unloaded"]["p99_ms"]
    if spans is not None:
        out["flooded_slowest"] = await slowest_text(spans, loaded)
        out["loop_lag"] = lag  # while the flooded probes ran
    return out


def collect(flood: multiprocessing.Process, results: object, timeout_s: float = 660.0) -> list[serve.Result]:
    """What the flood's process sent back once stopped (its requests then in flight end first); none if it died."""
    deadline, rows = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        try:
            rows = results.get(timeout=1.0)
            break
        except queue.Empty:
            if not flood.is_alive():
                break
    flood.join(timeout=30)
    if flood.is_alive():
        flood.kill()
    return [serve.Result(ok=ok, ttft=ttft, error=error) for ok, ttft, error in rows]


def flood_clients(
    base_url: str, model: str, tokenizer: str, input_len: int, image_size: int, max_images: int, clients: int,
    seed: int, running: object, stop: object, results: object,
) -> None:  # fmt: skip
    """The flood's process: `clients` clients each sending requests of 1 to `max_images` new pictures, one after
    another, until `stop` is set; (ok, ttft, error) of each request goes to `results`."""

    async def flood() -> list[tuple[bool, float, str]]:
        prompts, rng, done = prompts_for(model, tokenizer, input_len), random.Random(seed), []

        async def one(client: serve.Client) -> None:
            while not stop.is_set():
                images = [serve.picture_url(rng, image_size) for _ in range(rng.randint(1, max_images))]
                r = await client.send(prompts.request(images, 16))
                done.append((r.ok, r.ttft, r.error))

        async with serve.Client(base_url, 600) as client:
            running.set()
            await asyncio.gather(*(one(client) for _ in range(clients)))
        return done

    results.put(asyncio.run(flood()))


async def slowest_text(spans: object, results: list[serve.Result], shown: int = 3, flush_s: float = 5.0) -> list[dict]:
    """The `shown` slowest of `results` (text-only requests whose spans `spans`, a SpanTail, saw), each TTFT split
    per hop and span as bench/pipeline_cost.py does."""
    cost, ids = cost_module(), {r.id for r in results if r.ok}
    deadline = time.monotonic() + flush_s
    while True:  # each process writes its spans every 200 ms
        rows = [r for r in cost.breakdown(spans.read()) if r["request_id"] in ids]
        if len(rows) == len(ids) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    out = []
    for r in sorted(rows, key=lambda r: -r["ttft_ms"])[:shown]:
        detail = {label: round(ms, 2) for hop in r["detail_ms"].values() for label, ms in hop.items() if ms >= 1}
        engine = {"prefill.forward": round(r["prefill_ms"], 2)}  # (its batcher's wait included)
        out.append({"ttft_ms": round(r["ttft_ms"], 2), "hops_ms": r["hops_ms"], "spans_ms": engine | detail})
    return out


async def repeat_test(args: argparse.Namespace, target: Target) -> dict:
    """TTFT of one new picture per request, one at a time, against the same picture sent again right after."""
    prompts, rng = probe_prompts(args, target), random.Random(args.seed + 11)
    new, again = [], []
    async with serve.Client(target.base_url, 600) as client:
        for _ in range(args.probe):
            url = serve.picture_url(rng, args.image_size)
            new.append(await client.send(prompts.request([url], 4)))
            again.append(await client.send(prompts.request([url], 4)))
    out = {"new": ttft_stats(new), "repeated": ttft_stats(again)}
    if out["new"]["n"] and out["repeated"]["n"]:
        out["median_ratio"] = out["repeated"]["median_ms"] / out["new"]["median_ms"]
    return out


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process with its children (a server's engine processes), and by
    this one alone (Linux /proc; a child that has exited is no longer counted)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid: (parent, CPU seconds)
    for f in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = f.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(f.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)

    def tree(pid: int) -> float:
        return stats[pid][1] + sum(tree(c) for c in children.get(pid, ()))

    out = {name: tree(pid) for name, pid in pids.items() if pid in stats}
    return out | {"bench client": stats[os.getpid()][1]}  # alone: the cluster's processes are its children


def cluster_pids(cluster: Cluster) -> dict[str, int]:
    pids = {name: p.pid for name, p in cluster.procs.items()}
    pids |= {"nats": cluster.nats.proc.pid} if getattr(cluster.nats, "proc", None) else {}
    return pids | ({"mooncake-master": cluster.master.proc.pid} if cluster.master is not None else {})


async def scrape(cluster: Cluster | None) -> dict[str, list]:
    """Every epd process's Prometheus samples (the gateway's and each worker's), by process: name, labels, value."""
    if cluster is None:
        return {}
    from epd.ops.status_view import gather_status  # noqa: PLC0415
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    workers, _ = await gather_status(cluster.settings.nats_url)
    urls = {"gateway": f"{cluster.base_url}/metrics"}
    for w in sorted(workers, key=lambda w: (w.role, w.worker_id)):
        if w.metrics_url:
            urls[f"{w.role}-{sum(name.startswith(w.role + '-') for name in urls)}"] = w.metrics_url
    out = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for name, url in urls.items():
            families = text_string_to_metric_families((await client.get(url)).text)
            out[name] = [(s.name, s.labels, s.value) for family in families for s in family.samples]
    return out


def total(samples: dict[str, list], processes: tuple[str, ...], name: str, **labels: str) -> float:
    """The sum of metric `name` (with `labels`) over the processes whose name starts with one of `processes`."""
    return sum(
        v
        for proc, rows in samples.items()
        if proc.startswith(processes)
        for n, have, v in rows
        if n == name and labels.items() <= have.items()
    )


def delta(before: dict, after: dict, processes: tuple[str, ...], name: str, **labels: str) -> float:
    """How much `total` grew from one scrape to the next."""
    return total(after, processes, name, **labels) - total(before, processes, name, **labels)


def decode_engine(before: dict[str, list], after: dict[str, list]) -> dict:
    """The decoders' own mean step time and batch between two scrapes (epd's engine: vLLM keeps no such counter)."""
    decoders = ("decode-", "pd-", "epd-")
    steps = delta(before, after, decoders, "epd_decode_step_seconds_count")
    step_s = delta(before, after, decoders, "epd_decode_step_seconds_sum")
    batches = delta(before, after, decoders, "epd_batch_size_count", stage="decode")
    batched = delta(before, after, decoders, "epd_batch_size_sum", stage="decode")
    return {
        "decode_step_ms": 1e3 * step_s / steps if steps else None,
        "decode_batch": batched / batches if batches else None,
    }


def loop_lag(before: dict[str, list], after: dict[str, list]) -> dict[str, dict]:
    """Each process's event-loop lateness between two scrapes: seconds late in all, and ticks over 100 ms late."""
    out = {}
    for proc in after:
        was, now = {proc: before.get(proc, [])}, {proc: after[proc]}  # this process alone (not decode-10 in decode-1)
        ticks = delta(was, now, (proc,), "epd_event_loop_lag_seconds_count")
        if ticks:
            late = ticks - delta(was, now, (proc,), "epd_event_loop_lag_seconds_bucket", le="0.1")
            lag_s = delta(was, now, (proc,), "epd_event_loop_lag_seconds_sum")
            out[proc] = {"late_s": round(lag_s, 3), "ticks_over_100ms": int(late)}
    return out


async def busy(target: Target, step: Awaitable) -> tuple[object, dict]:
    """`step`'s result; each process's share of one core while it ran (1.0: a core kept busy throughout); the
    decoders' own mean step time and batch; each process's event-loop lateness (epd clusters)."""
    before, scraped, started = cpu_seconds(target.pids), await scrape(target.cluster), time.perf_counter()
    result = await step
    wall, after = time.perf_counter() - started, cpu_seconds(target.pids)
    now = await scrape(target.cluster)
    cores = {name: round((after[name] - before[name]) / wall, 2) for name in after if name in before}
    return result, {"cores": cores, "engine": decode_engine(scraped, now), "loop_lag": loop_lag(scraped, now)}


def gpu_memory() -> list[dict]:
    """Each process's memory on the GPU, as nvidia-smi reports it (empty without one)."""
    try:
        csv = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [{"pid": int(p), "mib": int(m)} for p, m in (line.split(",") for line in csv.splitlines() if "," in line)]


async def steps(args: argparse.Namespace, target: Target, out: dict, save: Callable[[], None]) -> None:
    """Steps 1-5 (module doc) against `target`, each step's figures into `out` and saved as it ends (a run cut
    short keeps them); 5 on an epd cluster with epd's engine only (its spans)."""
    await serve.bench(bench_args(args, target, "random-mm", [math.inf], args.warmup))  # not counted
    out["gpu_memory"] = gpu_memory()
    mm = bench_args(args, target, "random-mm", args.rates, args.num_prompts)
    out["random_mm"], out["cpu_random_mm"] = await busy(target, serve.bench(mm))
    save()
    text = bench_args(args, target, "text", args.text_rates, args.num_prompts)
    out["text"], out["cpu_text"] = await busy(target, serve.bench(text))
    save()
    print(f"   cores busy: random-mm {out['cpu_random_mm']}, text {out['cpu_text']}", flush=True)
    out["flood"] = await flood_test(args, target)
    save()
    print(f"   flood: {json.dumps(out['flood'])}", flush=True)
    out["repeated_images"] = await repeat_test(args, target)
    save()
    print(f"   repeated images: {json.dumps(out['repeated_images'])}", flush=True)
    if target.cluster is not None and target.cluster.settings.engine == "epd":
        out["pipeline_cost"] = await pipeline_cost(args, target.cluster)


def run_label(topology: str, engine: str) -> str:
    """A cluster's name in the results and the plot: its topology, and its engine unless epd's own."""
    return topology if engine == "epd" else f"{topology} ({engine})"


async def topology_run(args: argparse.Namespace, topology: str, workdir: Path, out: dict, save: Callable) -> None:
    from epd.ops.up import Cluster  # noqa: PLC0415

    started = time.perf_counter()
    cluster = await asyncio.to_thread(
        Cluster.local, args.model_dir, workdir, topology, None, args.startup_timeout_s, **cluster_settings(args)
    )
    out.update(startup_s=time.perf_counter() - started, engine=args.engine)
    label = run_label(topology, args.engine)
    print(f"== {label}: up in {out['startup_s']:.0f} s", flush=True)
    target = Target(label, cluster.base_url, cluster.settings.model_name, cluster_pids(cluster), cluster)
    try:
        await steps(args, target, out, save)
    except Exception as e:  # noqa: BLE001 - keep what the other steps measured
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"   {label} failed: {out['error']}", flush=True)
    finally:
        await asyncio.to_thread(cluster.stop)


async def server_run(args: argparse.Namespace, workdir: Path, out: dict, save: Callable) -> None:
    """Steps 1-4 against the server `--server` starts (its output in workdir/server.log), stopped after."""
    from epd.ops.processes import log_tail, spawn, stop  # noqa: PLC0415

    log = workdir / "server.log"
    proc = spawn(shlex.split(args.server), log)
    started = time.perf_counter()
    out["command"] = args.server
    try:
        model = await served_model(args.server_url, proc, log, args.startup_timeout_s)
        out["startup_s"] = time.perf_counter() - started
        print(f"== {args.server_label}: {model} up in {out['startup_s']:.0f} s", flush=True)
        await steps(args, Target(args.server_label, args.server_url, model, {"server": proc.pid}), out, save)
    except Exception as e:  # noqa: BLE001 - keep what the other steps measured
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"   {args.server_label} failed: {out['error']}\n{log_tail(log)}", flush=True)
    finally:
        await asyncio.to_thread(stop, [proc])


async def served_model(base_url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    """The first model `base_url/v1/models` lists, once it answers; an error with the log's end if the server
    exits first or does not answer within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
            try:
                r = await client.get(f"{base_url}/v1/models")
                if r.status_code == 200 and r.json().get("data"):
                    return r.json()["data"][0]["id"]
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"the server did not answer {base_url}/v1/models within {timeout_s:.0f} s")


def cost_module():  # noqa: ANN201 - bench/pipeline_cost.py, beside this script
    import pipeline_cost  # noqa: PLC0415

    return pipeline_cost


async def pipeline_cost(args: argparse.Namespace, cluster: Cluster) -> dict:
    """bench/pipeline_cost.py at low load: new pictures, then text only; each request's TTFT split per hop."""
    cost = cost_module()
    out = {}
    for kind, image in (("image", lambda i: cost.picture_url(10_000 + i, args.image_size)), ("text", None)):
        summary = await cost.measure(cluster.base_url, cluster.settings.model_name, Path(cluster.settings.trace_dir),
                                     args.probe, image)  # fmt: skip
        summary.pop("rows", None)
        out[kind] = summary
        print(cost.table(f"{cluster.settings.topology} {kind}", summary), flush=True)
    return out


def print_table(results: dict) -> None:
    print(
        f"\n{'topology':<8} {'workload':<10} {'rate':>5} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>9} "
        f"{'p99':>7} {'TPOT p50':>9} {'p99':>6} {'goodput':>7} {'ok':>7}"
    )
    for topology, t in results.items():
        for run in t.get("random_mm", []) + t.get("text", []):
            good = "-" if run["request_goodput"] is None else f"{run['request_goodput']:.2f}"
            print(
                f"{topology:<8} {run['workload']:<10} {run['request_rate']!s:>5} {run['request_throughput']:>6.2f} "
                f"{run['output_throughput']:>9.0f} {run['median_ttft_ms']:>9.0f} {run['p99_ttft_ms']:>7.0f} "
                f"{run['median_tpot_ms']:>9.1f} {run['p99_tpot_ms']:>6.1f} {good:>7} "
                f"{run['completed']:>3}/{run['num_prompts']:<3}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True, help="the checkpoint (built there if missing)")
    p.add_argument("--topologies", nargs="*", default=["e-p-d", "e-pd", "epd"], help="none: --server's only")
    p.add_argument("--engine", default="epd", choices=("epd", "vllm"), help="the clusters' pd and epd engine")
    p.add_argument("--server", default="", help="a command that starts an OpenAI-compatible server to run beside")
    p.add_argument("--server-url", default="http://127.0.0.1:8000", help="where --server's server answers")
    p.add_argument("--server-label", default="server", help="its name in the results and the plot")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--small", action="store_true", help="build the small checkpoint (a check on the CPU)")
    p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8, math.inf])
    p.add_argument("--text-rates", type=float, nargs="+", default=[4, math.inf])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--probe", type=int, default=16, help="requests of each one-at-a-time measurement")
    p.add_argument("--flood", type=int, default=8, help="clients sending new pictures during the flood")
    p.add_argument("--flood-ramp-s", type=float, default=3.0)
    p.add_argument("--input-len", type=int, default=400)
    p.add_argument("--output-len", type=int, default=150)
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--goodput", nargs="*", default=["ttft:2000", "tpot:50"])
    p.add_argument("--kv-cache-mb", type=float, default=24576)
    p.add_argument("--kv-buffer-mb", type=float, default=4096)
    p.add_argument("--segment-mb", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--workdir", type=Path, default=None, help="keep each cluster's logs and spans here")
    p.add_argument("--out", type=Path, default=RESULTS / "serve_gpu.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "serve_gpu.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not (args.model_dir / "config.json").exists():
        from epd.tools.random_checkpoint import build  # noqa: PLC0415

        t = time.perf_counter()
        build(args.model_dir, small=args.small)
        print(f"built {args.model_dir} in {time.perf_counter() - t:.0f} s", flush=True)
    gpu = "none"
    try:
        import torch  # noqa: PLC0415

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        pass
    results: dict = {}
    report = {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} vCPU, GPU {gpu}",
        "command": "python bench/serve_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each step: a run cut short keeps what it measured
        args.out.write_text(json.dumps(report) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for topology in args.topologies:
            label = run_label(topology, args.engine)
            results[label] = {}
            asyncio.run(topology_run(args, topology, (args.workdir or Path(tmp)) / topology, results[label], save))
            save()
        if args.server:
            workdir = (args.workdir or Path(tmp)) / "server"
            workdir.mkdir(parents=True, exist_ok=True)
            results[args.server_label] = {}
            asyncio.run(server_run(args, workdir, results[args.server_label], save))
            save()
    print_table(results)
    print(f"wrote {args.out}")
    runs = [run for t in results.values() for run in t.get("random_mm", [])]
    if runs:
        serve.plot(runs, args.plot)
        print(f"wrote {args.plot}")
    return report


if __name__ == "__main__":
    main()
