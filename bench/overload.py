"""Overload: `epd up --encoders 2 --prefills 2 --decoders 2` offered `--factor` times what it can serve, for
`--seconds`; checks that what it cannot take is refused with Retry-After, and that nothing it took is lost.

1. Capacity: `--clients` closed-loop clients for `--probe` seconds (each sends its next request when the last
   one is answered): completed requests/s is what the cluster serves.
2. Overload: Poisson arrivals at `--factor` x that rate for `--seconds`, open loop (nobody waits for an answer
   to send the next), the chaos soak's mix of text, new and repeated pictures, streamed and not. No retries:
   a 429 or 503 must carry Retry-After and counts as refused; every request answered 200 must be the oracle's
   answer (transformers' generate), once; anything else (no answer, a 500, a wrong or repeated answer) is a loss.
3. Memory of every process, sampled every 2 s: the bound stated in `--memory-mib` (growth over the first sample,
   per process) must hold.

    .venv/bin/python bench/overload.py [--factor 4] [--seconds 60] [--max-inflight 64] [--model DIR]

Prints a table and writes bench/results/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos  # noqa: E402 - the soak's workload, oracle, client and process view

ROOT = chaos.ROOT


async def one(http: httpx.AsyncClient, spec: chaos.Spec, model: str) -> chaos.Outcome:
    """A single attempt (no retries): a refusal stays a refusal."""
    out = chaos.Outcome(spec.index, spec.kind, spec.stream, False)
    req = chaos.body(spec, model)
    started = time.perf_counter()
    try:
        if spec.stream:
            wait = await chaos._stream_once(http, spec, req, out)
        else:
            r = await http.post("/v1/chat/completions", json=req)
            out.status, wait, out.terminals = r.status_code, chaos._retry_after(r), 1
            if r.status_code == 200:
                out.text = r.json()["choices"][0]["message"]["content"]
                out.completion_tokens = r.json()["usage"]["completion_tokens"]
            else:
                out.error = r.text[:300]
        if out.status in (429, 503):
            out.verdict = "refused" if wait is not None else "refused without Retry-After"
    except (httpx.HTTPError, OSError) as e:
        out.error, out.terminals, out.verdict = f"{type(e).__name__}: {e}", 0, "lost"
    out.latency_s = time.perf_counter() - started
    return out  # an answer's verdict waits for the oracle (judge)


def judge(specs: list[chaos.Spec], outcomes: list[chaos.Outcome], model: Path) -> None:
    """The oracle's answers for what was answered, then each answer's verdict."""
    answered = [(s, o) for s, o in zip(specs, outcomes, strict=True) if not o.verdict]
    chaos.with_oracle([s for s, _ in answered], model)
    for spec, out in answered:
        out.verdict = chaos.verdict(spec, out)


async def capacity(http: httpx.AsyncClient, specs: list[chaos.Spec], model: str, clients: int, seconds: float) -> float:
    """Requests/s that `clients` closed-loop clients complete."""
    done, stop_at, queue = [0], time.monotonic() + seconds, list(specs)

    async def client() -> None:
        while time.monotonic() < stop_at and queue:
            out = await one(http, queue.pop(), model)
            if out.status == 200 and out.terminals == 1:
                done[0] += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done[0] / (time.monotonic() - started)


async def overload(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    probe, load = chaos.workload(400, args.seed), chaos.workload(int(args.seconds * 100), args.seed + 1)
    for spec in probe + load:
        spec.cancel = False  # every answer is checked whole
        spec.stream = spec.stream and not args.no_stream
    os.environ["EPD_MAX_INFLIGHT"] = str(args.max_inflight)
    # small batches: a capacity that one client process on this machine can offer 4x of
    os.environ["EPD_MAX_SEQS"], os.environ["EPD_MAX_BATCH"] = str(args.max_seqs), str(args.max_batch)
    workdir = Path(tempfile.mkdtemp(prefix="epd-overload-"))
    up = chaos.Up(args.model, workdir)
    mem, stop_event = chaos.Memory(), asyncio.Event()
    sampler = asyncio.create_task(chaos.sample_memory(up, mem, stop_event))
    try:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=up.base_url, timeout=args.timeout, limits=limits) as http:
            rate = await capacity(http, probe, args.model.name, args.clients, args.probe)
            offered = args.factor * rate
            print(f"capacity {rate:.2f} requests/s; offering {offered:.2f}/s for {args.seconds:.0f} s", flush=True)
            tasks, started, i = [], time.monotonic(), 0
            while time.monotonic() - started < args.seconds and i < len(load):
                tasks.append(asyncio.create_task(one(http, load[i], args.model.name)))
                i += 1
                await asyncio.sleep(rng.expovariate(offered))
            sent_for = time.monotonic() - started
            outcomes = list(await asyncio.gather(*tasks))
            drained = time.monotonic() - started
    finally:
        stop_event.set()
        await sampler
        up.stop()
    await asyncio.to_thread(judge, load[: len(outcomes)], outcomes, args.model)
    return report(args, rate, offered, sent_for, drained, outcomes, mem)


def report(args, rate, offered, sent_for, drained, outcomes, mem) -> dict:  # noqa: ANN001
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.verdict] = counts.get(o.verdict, 0) + 1
    accepted = [o for o in outcomes if not o.verdict.startswith("refused")]
    lost = [o for o in accepted if o.verdict != "ok"]
    growth = {n: (mem.peak[n] - mem.first[n]) / 2**20 for n in mem.peak}
    ok_lat = sorted(o.latency_s for o in accepted if o.verdict == "ok")
    refused_lat = sorted(o.latency_s for o in outcomes if o.verdict == "refused")
    result = {
        "command": "python bench/overload.py " + " ".join(sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "max_inflight": args.max_inflight,
        "max_seqs": args.max_seqs,
        "max_batch": args.max_batch,
        "capacity_rps": rate,
        "offered_rps": offered,
        "sent": len(outcomes),
        "sent_for_s": sent_for,
        "achieved_rps": len(outcomes) / sent_for,
        "achieved_factor": len(outcomes) / sent_for / rate,
        "drained_s": drained,
        "verdicts": counts,
        "accepted": len(accepted),
        "lost": len(lost),
        "accepted_latency_s": {"p50": chaos._pct(ok_lat, 0.5), "p99": chaos._pct(ok_lat, 0.99)},
        "refusal_latency_s": {"p50": chaos._pct(refused_lat, 0.5), "p99": chaos._pct(refused_lat, 0.99)},
        "memory_bound_mib": args.memory_mib,
        "memory_growth_mib": growth,
        "memory_peak_mib": {n: p / 2**20 for n, p in mem.peak.items()},
        "failures": [{"index": o.index, "verdict": o.verdict, "status": o.status, "error": o.error} for o in lost][:20],
    }
    print(
        f"\nsent {len(outcomes)} in {sent_for:.0f} s: {result['achieved_rps']:.2f}/s, "
        f"{result['achieved_factor']:.1f}x the capacity of {rate:.2f}/s (asked {args.factor}x)"
    )
    print(
        f"accepted {len(accepted)} (ok {counts.get('ok', 0)}, lost {len(lost)}); refused with Retry-After "
        f"{counts.get('refused', 0)}, without {counts.get('refused without Retry-After', 0)}"
    )
    print(f"accepted latency p50/p99 {result['accepted_latency_s']}; refusal {result['refusal_latency_s']}")
    for n in sorted(growth):
        print(f"  {n:<18} peak {mem.peak[n] / 2**20:>6.0f} MiB, growth {growth[n]:>5.0f} MiB")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=float, default=4.0, help="offered load over the measured capacity")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the overload lasts")
    ap.add_argument("--probe", type=float, default=20.0, help="seconds of closed-loop load to measure capacity")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients of the capacity probe")
    ap.add_argument("--max-inflight", type=int, default=64, help="EPD_MAX_INFLIGHT of the gateway")
    ap.add_argument("--no-stream", action="store_true", help="every request unstreamed (less client work a request)")
    ap.add_argument("--max-seqs", type=int, default=4, help="EPD_MAX_SEQS of each decoder")
    ap.add_argument("--max-batch", type=int, default=2, help="EPD_MAX_BATCH of each encoder and prefill worker")
    ap.add_argument("--memory-mib", type=float, default=300.0, help="the bound: growth of any process")
    ap.add_argument("--model", type=Path, default=chaos.SHIPPED)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    args = ap.parse_args()
    result = asyncio.run(overload(args))
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    bad = result["lost"] or result["verdicts"].get("refused without Retry-After", 0)
    over = [n for n, g in result["memory_growth_mib"].items() if g > args.memory_mib]
    sys.exit(1 if bad or over else 0)


if __name__ == "__main__":
    main()
