"""Overload: `epd up --encoders 2 --prefills 2 --decoders 2` offered `--factor` times what it serves, for
`--seconds`, open loop; what it cannot take must be refused with Retry-After, nothing it took may be lost, and
every process's memory must stay under a bound that follows from the settings.

1. Capacity, measured in the same run: closed-loop clients at each concurrency of `--sweep` for `--step`
   seconds each; the capacity is the most requests/s completed (200 and a whole answer) at any of them.
2. Overload: Poisson arrivals at `--factor` x that capacity for `--seconds`, open loop (nobody waits for an
   answer to send the next), the chaos soak's mix of text, new and repeated pictures, streamed and not, every
   request asking `--max-tokens`, no retries. The rate actually offered is measured (requests written over
   the time it took to write them) and so is the generator's lag behind its schedule.
3. Verdicts, after the run: a 429 or 503 with Retry-After is refused; a 200 whose answer is whole (one
   finish, `[DONE]` for a stream, tokens counted) is ok, and for `--oracle` distinct prompts drawn at random
   it must also be transformers' `generate` answer; no response or an answer cut short is lost; anything else
   (another status, a refusal without Retry-After, an error in a stream, a wrong answer) is an error.
4. Memory: every process's RSS every `SAMPLE_S`, its peak against the bound `bounds()` derives from the settings.

The load client is bench/http_load.py (pre-built request bytes, raw HTTP/1.1, bodies parsed after the run):
httpx cost the old version of this bench as much CPU a request as the gateway, and with both on two cores it
offered 1.7x at most.

    .venv/bin/python bench/overload.py [--factor 4] [--seconds 60] [--sweep 4,8,16,32] [--step 8] [--model DIR]

Prints a table and writes bench/results/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos  # noqa: E402 - the soak's workload, oracle and `epd up`
import http_load  # noqa: E402

ROOT = chaos.ROOT
SAMPLE_S = 0.5
PATH = "/v1/chat/completions"
MAX_BODY_MB = 1  # the bench's largest body is under 100 KiB; the gateway's memory bound scales with this
SLACK_MIB = {"gateway": 64, "nats": 64, "mooncake-master": 64, "worker": 128}


@dataclass
class Phases:
    """Peak RSS of each process in each phase (idle before any load, sweep, overload, drain)."""

    phase: str = "idle"
    peak: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, name: str, rss: int) -> None:
        per = self.peak.setdefault(self.phase, {})
        per[name] = max(per.get(name, 0), rss)


async def sample(up: chaos.Up, phases: Phases, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for name, p in up.processes().items():
            if (rss := chaos.rss_bytes(p["pid"])) is not None:
                phases.add(name, rss)
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_S)
        except asyncio.TimeoutError:
            pass


def bounds(idle: dict[str, int], kinds: dict[str, str], max_inflight: int) -> dict[str, dict]:
    """Each process's bound: its RSS at idle (weights, runtimes, and what is taken at start: a decoder's KV
    cache and landing buffer, every worker's Mooncake segment) plus what requests in progress may add, whose
    number the settings bound whatever the offered load:
    - gateway: at most `max_inflight` requests are inside (the door refuses the rest before reading them),
      each holding its body up to three times while it is admitted (the bytes, the parsed JSON's strings, the
      decoded image) and at most `MAX_BODY_MB` of it;
    - workers: a forward holds at most EPD_MAX_BATCH requests, a decoder EPD_MAX_SEQS sequences in its
      preallocated cache, and they fetch only what they have room for: no term grows with the load; the
      slack is for the allocator's and Python's working set;
    - NATS: each stage's stream holds at most `max_inflight` jobs (messages of a few KiB: bytes never ride
      NATS), reply subjects are not stored;
    - the Mooncake master: metadata of the keys the workers' fixed segments can hold."""
    out = {}
    for name, rss in idle.items():
        kind = kinds.get(name, "worker")
        slack = SLACK_MIB.get(kind, SLACK_MIB["worker"])
        per_request = 3 * MAX_BODY_MB * max_inflight if kind == "gateway" else 0
        out[name] = {
            "idle_mib": rss / 2**20,
            "requests_mib": per_request,
            "slack_mib": slack,
            "bound_mib": rss / 2**20 + per_request + slack,
        }
    return out


def request_bytes(specs: list[chaos.Spec], model: str, port: int) -> list[bytes]:
    return [http_load.post_bytes("127.0.0.1", port, PATH, json.dumps(chaos.body(s, model)).encode()) for s in specs]


async def closed_loop(pool: http_load.Pool, raws: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` clients, each sending its next request when the last is answered, for `seconds`."""
    done, other, stop_at, i = [0], [0], time.monotonic() + seconds, [0]

    async def client() -> None:
        while time.monotonic() < stop_at:
            raw = raws[i[0] % len(raws)]
            i[0] += 1
            a = await pool.request(raw, 120.0)
            if a.status == 200 and a.body:
                done[0] += 1
            else:
                other[0] += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.monotonic() - started
    return {"concurrency": clients, "completed": done[0], "other": other[0], "rps": done[0] / wall}


async def open_loop(pool: http_load.Pool, raws: list[bytes], rate: float, seconds: float, seed: int) -> dict:
    """Poisson arrivals at `rate` for `seconds`: each request written at its time whatever came back before."""
    rng = random.Random(seed)
    tasks, lag = [], []
    started = time.monotonic()
    due = started
    for raw in raws:
        due += rng.expovariate(rate)
        if due - started > seconds:
            break
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        lag.append(time.monotonic() - due)
        tasks.append(asyncio.create_task(pool.request(raw, 300.0)))
    sent_for = time.monotonic() - started
    answers = list(await asyncio.gather(*tasks))
    lag.sort()
    return {
        "answers": answers,
        "started": started,
        "sent_for_s": sent_for,
        "drained_s": time.monotonic() - started,
        "lag_s": {"p50": chaos._pct(lag, 0.5), "p99": chaos._pct(lag, 0.99), "max": lag[-1] if lag else None},
    }


def read_answer(spec: chaos.Spec, a: http_load.Answer) -> chaos.Outcome:
    """An answer's bytes into the soak's Outcome (text, usage, terminal events), once the load is over."""
    out = chaos.Outcome(spec.index, spec.kind, spec.stream, False, status=a.status, latency_s=a.latency_s)
    if a.status == 0:
        out.error, out.verdict = a.error, "lost"
        return out
    if a.status in (429, 503):
        out.verdict = "refused" if a.retry_after and a.retry_after.isdigit() else "refused without Retry-After"
        out.error = _message(a.body)
        return out
    if a.status != 200:
        out.error, out.verdict = a.body[:300].decode(errors="replace"), f"error {a.status}"
        return out
    if a.error:  # headers came, the answer did not
        out.error, out.verdict = a.error, "lost"
        return out
    if not spec.stream:
        r = json.loads(a.body)
        out.text, out.completion_tokens = r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]
        out.terminals = int(r["choices"][0].get("finish_reason") is not None)
        return out
    done = False
    for line in a.body.decode().split("\n"):
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[6:])
        if "error" in event:  # an error after the 200 began: the request was accepted, then failed
            out.terminals += 1
            out.error, out.verdict = event["error"].get("message", ""), "error in the stream"
            continue
        if event.get("usage"):
            out.completion_tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices", []):
            out.text += choice["delta"].get("content") or ""
            out.terminals += bool(choice.get("finish_reason"))
    if not done:
        out.terminals, out.error, out.verdict = 0, "stream ended without [DONE]", "lost"
    return out


def _message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


def judge(specs: list[chaos.Spec], outcomes: list[chaos.Outcome], model: Path, most: int, seed: int = 0) -> int:
    """Verdicts of the answered: whole (one finish, `[DONE]` for a stream, tokens counted), and, for `most`
    distinct prompts drawn at random (every one when fewer), transformers' `generate` answer. Every new picture
    is a distinct prompt, and generate takes about a second a prompt here: judging them all took longer than
    the run. Returns how many answers were compared with generate."""
    answered = [(s, o) for s, o in zip(specs, outcomes, strict=True) if not o.verdict]
    keys = sorted({(s.question, s.image or b"", s.max_tokens) for s, _ in answered})
    chosen = set(random.Random(seed).sample(keys, min(most, len(keys))))
    checked = [(s, o) for s, o in answered if (s.question, s.image or b"", s.max_tokens) in chosen]
    chaos.with_oracle([s for s, _ in checked], model)
    for spec, out in answered:
        if out.terminals != 1 or out.completion_tokens < 1:
            out.verdict = "lost" if out.terminals == 0 else "wrong answer (terminals)"
        elif (spec.question, spec.image or b"", spec.max_tokens) in chosen:
            v = chaos.verdict(spec, out)
            out.verdict = v if v == "ok" else f"wrong answer ({v})"
        else:
            out.verdict = "ok"
    return len(checked)


async def run(args: argparse.Namespace) -> dict:
    probe = chaos.workload(600, args.seed)
    for spec in probe:
        spec.cancel, spec.max_tokens = False, args.max_tokens
    os.environ.update(
        EPD_MAX_INFLIGHT=str(args.max_inflight),
        EPD_MAX_SEQS=str(args.max_seqs),
        EPD_MAX_BATCH=str(args.max_batch),
        EPD_MAX_BODY_MB=str(MAX_BODY_MB),
    )
    workdir = Path(tempfile.mkdtemp(prefix="epd-overload-"))
    up = chaos.Up(args.model, workdir)
    phases, stop = Phases(), asyncio.Event()
    sampler = asyncio.create_task(sample(up, phases, stop))
    pool = http_load.Pool("127.0.0.1", up.port)
    model = args.model.name
    try:
        await asyncio.sleep(3 * SAMPLE_S)  # the idle size of every process
        kinds = {n: p["kind"] for n, p in up.processes().items()}
        phases.phase = "sweep"
        probe_raws = request_bytes(probe, model, up.port)
        sweep = []
        for clients in args.sweep:
            sweep.append(await closed_loop(pool, probe_raws, clients, args.step))
            print(f"  concurrency {clients:>3}: {sweep[-1]['rps']:6.2f} requests/s completed", flush=True)
        capacity = max(s["rps"] for s in sweep)
        rate = args.factor * capacity
        phases.phase = "build"
        load = chaos.workload(math.ceil(rate * args.seconds * 1.3) + 50, args.seed + 1)
        for spec in load:
            spec.cancel, spec.max_tokens = False, args.max_tokens
            spec.stream = spec.stream and not args.no_stream
        raws = request_bytes(load, model, up.port)
        print(f"capacity {capacity:.2f} requests/s; offering {rate:.2f}/s for {args.seconds:.0f} s", flush=True)
        phases.phase = "overload"
        offered = await open_loop(pool, raws, rate, args.seconds, args.seed)
        phases.phase = "after"
        await asyncio.sleep(3 * SAMPLE_S)
    finally:
        stop.set()
        await sampler
        pool.close()
        up.stop()
    answers = offered.pop("answers")
    outcomes = [read_answer(s, a) for s, a in zip(load, answers, strict=False)]  # (load: more than was sent)
    statuses = {str(k): sum(a.status == k for a in answers) for k in sorted({a.status for a in answers})}
    print(f"sent {len(answers)} in {offered['sent_for_s']:.1f} s; statuses {statuses}", flush=True)
    print(f"judging {sum(not o.verdict for o in outcomes)} answers ...", flush=True)
    checked = await asyncio.to_thread(judge, load[: len(outcomes)], outcomes, args.model, args.oracle)
    bound = bounds(phases.peak["idle"], kinds, args.max_inflight)
    return report(args, sweep, capacity, rate, offered, answers, outcomes, phases, bound, checked)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def report(args, sweep, capacity, rate, offered, answers, outcomes, phases, bound, checked) -> dict:  # noqa: ANN001
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.verdict] = counts.get(o.verdict, 0) + 1
    sent = len(outcomes)
    refused = counts.get("refused", 0)
    accepted = sent - refused - counts.get("refused without Retry-After", 0)
    lost = counts.get("lost", 0)
    errors = sum(n for v, n in counts.items() if v not in ("ok", "refused", "lost"))
    ok_lat = sorted(o.latency_s for o in outcomes if o.verdict == "ok")
    refused_lat = sorted(o.latency_s for o in outcomes if o.verdict == "refused")
    statuses: dict[str, int] = {}
    reasons: dict[str, int] = {}  # which admission refused: the door's 429, no live worker (503), ...
    for o in outcomes:
        if o.verdict == "refused":
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
            reason = " ".join(w for w in o.error.split() if not w.isdigit())[:60]
            reasons[reason] = reasons.get(reason, 0) + 1
    window_end = offered["started"] + offered["sent_for_s"]
    in_window = sum(
        o.verdict == "ok" and a.sent_at + a.latency_s <= window_end for o, a in zip(outcomes, answers, strict=False)
    )
    overload_peak = phases.peak.get("overload", {})
    for name, b in bound.items():
        b["sweep_peak_mib"] = phases.peak.get("sweep", {}).get(name, 0) / 2**20
        b["overload_peak_mib"] = max(overload_peak.get(name, 0), phases.peak.get("after", {}).get(name, 0)) / 2**20
        b["within"] = b["overload_peak_mib"] <= b["bound_mib"]
    load = os.getloadavg()
    result = {
        "command": "python bench/overload.py " + " ".join(sys.argv[1:]),
        "host": {
            "cpus": os.cpu_count(),
            "cpu": _cpu(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "loadavg_after": load,
            "git": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
        },
        "model": str(args.model),
        "settings": {
            "EPD_MAX_INFLIGHT": args.max_inflight,
            "EPD_MAX_SEQS": args.max_seqs,
            "EPD_MAX_BATCH": args.max_batch,
            "EPD_MAX_BODY_MB": MAX_BODY_MB,
            "max_tokens": args.max_tokens,
        },
        "sweep": sweep,
        "capacity_rps": capacity,
        "asked_rps": rate,
        "sent": sent,
        "offered_rps": sent / offered["sent_for_s"],
        "offered_factor": sent / offered["sent_for_s"] / capacity,
        "generator_lag_s": offered["lag_s"],
        "sent_for_s": offered["sent_for_s"],
        "drained_s": offered["drained_s"],
        "accepted": accepted,
        "completed_rps": in_window / offered["sent_for_s"],  # answered while the overload lasted
        "verdicts": counts,
        "checked_against_generate": checked,
        "refused": refused,
        "refused_by_status": statuses,
        "refused_reasons": reasons,
        "lost": lost,
        "errors": errors,
        "accepted_latency_s": {"p50": chaos._pct(ok_lat, 0.5), "p99": chaos._pct(ok_lat, 0.99)},
        "refusal_latency_s": {"p50": chaos._pct(refused_lat, 0.5), "p99": chaos._pct(refused_lat, 0.99)},
        "memory": bound,
        "failures": [
            {"index": o.index, "verdict": o.verdict, "status": o.status, "error": o.error[:200]}
            for o in outcomes
            if o.verdict not in ("ok", "refused")
        ][:20],
    }
    print_table(result)
    return result


def print_table(r: dict) -> None:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print()
    print("sweep: " + ", ".join(f"{s['concurrency']} -> {s['rps']:.2f}/s" for s in r["sweep"]))
    print(
        f"capacity {r['capacity_rps']:.2f}/s; offered {r['offered_rps']:.2f}/s = {r['offered_factor']:.2f}x "
        f"({r['sent']} in {r['sent_for_s']:.1f} s; generator lag p99 {f(r['generator_lag_s']['p99'])} s)"
    )
    print(
        f"accepted {r['accepted']} (ok {r['verdicts'].get('ok', 0)}, {r['completed_rps']:.2f}/s), "
        f"refused with Retry-After {r['refused']} {r['refused_by_status']}, lost {r['lost']}, errors {r['errors']}"
    )
    print(
        f"accepted latency p50 {f(r['accepted_latency_s']['p50'])} s, p99 {f(r['accepted_latency_s']['p99'])} s; "
        f"refusals p50 {f(r['refusal_latency_s']['p50'])} s, p99 {f(r['refusal_latency_s']['p99'])} s"
    )
    print(f"refusals by reason: {r['refused_reasons']}")
    print(f"{'process':<18} {'idle':>6} {'sweep':>6} {'overload':>8} {'bound':>6}  MiB peak RSS")
    for n, b in sorted(r["memory"].items()):
        print(
            f"{n:<18} {b['idle_mib']:>6.0f} {b['sweep_peak_mib']:>6.0f} {b['overload_peak_mib']:>8.0f} "
            f"{b['bound_mib']:>6.0f}  {'' if b['within'] else 'OVER'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=float, default=4.0, help="offered load over the measured capacity")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the overload lasts")
    ap.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16, 32])
    ap.add_argument("--step", type=float, default=8.0, help="seconds at each concurrency of the sweep")
    ap.add_argument("--max-inflight", type=int, default=64, help="EPD_MAX_INFLIGHT of the gateway")
    ap.add_argument("--max-seqs", type=int, default=4, help="EPD_MAX_SEQS of each decoder")
    ap.add_argument("--max-batch", type=int, default=2, help="EPD_MAX_BATCH of each encoder and prefill worker")
    ap.add_argument("--max-tokens", type=int, default=48, help="every request's max_tokens")
    ap.add_argument("--no-stream", action="store_true", help="every request unstreamed")
    ap.add_argument("--oracle", type=int, default=300, help="distinct prompts whose answers generate checks")
    ap.add_argument("--model", type=Path, default=chaos.SHIPPED)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    over = [n for n, b in result["memory"].items() if not b["within"]]
    sys.exit(1 if result["lost"] or result["errors"] or over else 0)


if __name__ == "__main__":
    main()
