"""Chaos soak: `epd up --encoders 2 --prefills 2 --decoders 2` under load while workers, NATS and the Mooncake
master are killed with SIGKILL; checks that no accepted request is lost.

The load: `--requests` chat requests from `--clients` concurrent clients, a mix of text, new pictures (never
seen before: encoded), repeated pictures (encoder-cache hits), streamed and not, some streams cancelled by
their client after the first token. A client retries a 503 or 429 after its Retry-After, as OpenAI's clients
do. Every `--fault-every` seconds (once the last fault recovered) a fault: SIGKILL of a random encode,
prefill or decode worker, or now and then of the NATS server or the Mooncake master; `epd up` starts each
again. `--short` is the CI version: every kind of fault once, then random ones.

Checked, per request: exactly one terminal answer (a finish or an error; for a stream, one finish event and
`[DONE]`); greedy text equal to transformers' `generate` (tests/oracle.py) and usage counting its tokens
(longer: duplicated tokens; otherwise different: missing ones); memory of every process, sampled.

    .venv/bin/python bench/chaos.py [--requests 2000] [--clients 8] [--fault-every 4] [--duration S] [--short]
        [--model DIR]

Prints a table and writes bench/results/chaos.json (chaos-short.json with --short).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.oracle: the correctness oracle

from epd.ops.processes import free_port, spawn, stop, wait_until  # noqa: E402
from epd.ops.supervisor import read_state  # noqa: E402
from epd.tools import shapes  # noqa: E402
from epd.tools.demo_model import SHIPPED  # noqa: E402

WORKER_KINDS = ("encode", "prefill", "decode")
FAULT_KINDS = (*WORKER_KINDS, "nats", "mooncake-master")
QUESTIONS = ("What color is the shape?", "What shape is it?", "Describe the image.")
TEXTS = tuple(f"Say something about the number {i}." for i in range(12))
RETRIES = 8  # a client's retries of a 503 / 429
RECOVERY_LIMIT_S = 120.0  # a fault not recovered by then counts as not recovered


@dataclass
class Spec:
    index: int
    kind: str  # text | new | repeat
    question: str
    image: bytes | None
    max_tokens: int
    stream: bool
    cancel: bool
    expected: tuple[list[int], str] = ((), "")


@dataclass
class Outcome:
    index: int
    kind: str
    stream: bool
    cancel: bool
    status: int = 0
    text: str = ""
    completion_tokens: int = -1
    terminals: int = 0
    retries: int = 0
    latency_s: float = 0.0
    error: str = ""
    verdict: str = ""  # ok | cancelled | lost | duplicated | missing | failed


@dataclass
class Fault:
    kind: str
    name: str
    at: float
    restarted_s: float | None = None
    ready_s: float | None = None


@dataclass
class Memory:
    first: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)


def png(rng: random.Random, size: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    shapes.draw(rng, size=size or (rng.randint(64, 200), rng.randint(64, 200))).image.save(buf, "PNG")
    return buf.getvalue()


def workload(n: int, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    repeated = [png(rng) for _ in range(6)]
    specs = []
    for i in range(n):
        r = rng.random()
        kind = "text" if r < 0.4 else "new" if r < 0.7 else "repeat"
        image = None if kind == "text" else png(rng) if kind == "new" else rng.choice(repeated)
        question = rng.choice(TEXTS) if kind == "text" else rng.choice(QUESTIONS)
        cancel = rng.random() < 0.08
        stream = cancel or rng.random() < 0.5
        specs.append(Spec(i, kind, question, image, rng.choice((8, 24, 48)), stream, cancel))
    return specs


def with_oracle(specs: list[Spec], model: Path) -> None:
    """generate's greedy answer for each distinct (question, image, max_tokens)."""
    from tests.oracle import reference

    cache: dict[tuple, tuple[list[int], str]] = {}
    for s in specs:
        key = (s.question, s.image, s.max_tokens)
        if key not in cache:
            cache[key] = reference(model, s.question, s.image, s.max_tokens)
        s.expected = cache[key]


def body(spec: Spec, model_name: str) -> dict:
    content: list[dict] = [{"type": "text", "text": spec.question}]
    if spec.image:
        url = "data:image/png;base64," + base64.b64encode(spec.image).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    out = {
        "model": model_name,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "stream": spec.stream,
    }
    if spec.stream:
        out["stream_options"] = {"include_usage": True}
    return out


async def _stream_once(http: httpx.AsyncClient, spec: Spec, req: dict, out: Outcome) -> int | None:
    """One streamed attempt; returns a Retry-After to wait, or None when the answer is final."""
    async with http.stream("POST", "/v1/chat/completions", json=req) as r:
        out.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            return _retry_after(r)
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                out.terminals += 1
                out.error = event["error"].get("message", "")
                out.status = 500
                continue
            if event.get("usage"):
                out.completion_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                out.text += choice["delta"].get("content") or ""
                if choice.get("finish_reason"):
                    out.terminals += 1
            if spec.cancel and out.text:  # the client goes away after its first token
                return None
        if not done:
            out.error = out.error or "stream ended without [DONE]"
    return None


def _retry_after(r: httpx.Response) -> int | None:
    if r.status_code in (429, 503) and "retry-after" in r.headers:
        return int(r.headers["retry-after"])
    return None


async def run_one(http: httpx.AsyncClient, spec: Spec, model_name: str) -> Outcome:
    out = Outcome(spec.index, spec.kind, spec.stream, spec.cancel)
    req = body(spec, model_name)
    started = time.perf_counter()
    try:
        for attempt in range(RETRIES + 1):
            out.retries, out.text, out.terminals, out.error = attempt, "", 0, ""
            if spec.stream:
                wait = await _stream_once(http, spec, req, out)
            else:
                r = await http.post("/v1/chat/completions", json=req)
                out.status, wait = r.status_code, _retry_after(r)
                out.terminals = 1
                if r.status_code == 200:
                    out.text = r.json()["choices"][0]["message"]["content"]
                    out.completion_tokens = r.json()["usage"]["completion_tokens"]
                else:
                    out.error = r.text[:300]
            if wait is None or attempt == RETRIES:
                break
            await asyncio.sleep(wait)
    except (httpx.HTTPError, OSError) as e:  # no answer at all: lost
        out.error = f"{type(e).__name__}: {e}"
        out.terminals = 0
    out.latency_s = time.perf_counter() - started
    out.verdict = verdict(spec, out)
    return out


def verdict(spec: Spec, out: Outcome) -> str:
    if spec.cancel and out.status == 200 and out.text:
        return "cancelled"
    if out.terminals != 1:
        return "lost" if out.terminals == 0 else "duplicated"
    if out.status != 200:
        return "failed"
    ids, want = spec.expected
    if out.text == want and out.completion_tokens == len(ids):
        return "ok"
    if len(out.text) > len(want) or out.completion_tokens > len(ids):
        return "duplicated"
    return "missing"


class Up:
    """`epd up` as a user runs it, in a fresh workdir."""

    def __init__(self, model: Path, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "epd.ops.cli", "up", "--model", str(model), "--workdir", str(workdir)]
        argv += ["--port", str(self.port), "--encoders", "2", "--prefills", "2", "--decoders", "2"]
        self.log = workdir / "up.log"
        self.proc = spawn(argv, self.log, env={**os.environ, "EPD_MOONCAKE_SEGMENT_MB": "64"})
        wait_until(lambda: "serving" in self.log.read_text(), 300, "epd up", self.proc)

    def processes(self) -> dict[str, dict]:
        return (read_state(self.workdir) or {}).get("processes", {})

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            stop([self.proc])


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def chaos(up: Up, every_s: float, short: bool, faults: list[Fault], stop_event: asyncio.Event) -> None:
    rng = random.Random(1)
    plan = ["decode", "prefill", "encode", "nats", "mooncake-master"] if short else []
    while not stop_event.is_set():
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=every_s)
            return
        except asyncio.TimeoutError:
            pass
        kind = plan.pop(0) if plan else rng.choices(FAULT_KINDS, weights=(3, 3, 3, 1, 1))[0]
        procs = up.processes()
        names = [n for n, p in procs.items() if p["kind"] == kind and p["state"] == "running"]
        if not names:
            continue
        name = rng.choice(names)
        before = procs[name]["pid"]
        fault = Fault(kind, name, time.monotonic())
        try:
            os.kill(before, signal.SIGKILL)
        except ProcessLookupError:
            continue
        faults.append(fault)
        print(f"  fault {len(faults)}: SIGKILL {name} (pid {before})", flush=True)
        while time.monotonic() - fault.at < RECOVERY_LIMIT_S:  # recovered: started again, and the gateway ready
            # (waited out even when the load has ended: a fault's recovery is measured whole)
            p = up.processes().get(name, {})
            if fault.restarted_s is None and p.get("pid") != before and p.get("state") == "running":
                fault.restarted_s = time.monotonic() - fault.at
            if fault.restarted_s is not None and await asyncio.to_thread(_ready, up.base_url):
                fault.ready_s = time.monotonic() - fault.at
                break
            await asyncio.sleep(0.2)


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def sample_memory(up: Up, mem: Memory, stop_event: asyncio.Event) -> None:
    while not stop_event.is_set():
        for name, p in up.processes().items():
            rss = rss_bytes(p["pid"])
            if rss is not None:
                mem.first.setdefault(name, rss)
                mem.peak[name] = max(mem.peak.get(name, 0), rss)
                mem.last[name] = rss
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=2.0)
        except asyncio.TimeoutError:
            pass


async def soak(args: argparse.Namespace) -> dict:
    specs = workload(args.requests, args.seed)
    t = time.monotonic()
    await asyncio.to_thread(with_oracle, specs, args.model)
    print(f"oracle: {len({(s.question, s.image, s.max_tokens) for s in specs})} answers in {time.monotonic() - t:.0f}s")
    workdir = Path(tempfile.mkdtemp(prefix="epd-chaos-"))
    up = Up(args.model, workdir)
    model_name = args.model.name
    faults: list[Fault] = []
    mem = Memory()
    stop_event = asyncio.Event()
    outcomes: list[Outcome] = []
    try:
        queue = list(reversed(specs))
        started = time.monotonic()

        spread = args.duration or 0.0  # request i starts no sooner than i * duration / requests

        async def client(http: httpx.AsyncClient) -> None:
            while queue:
                spec = queue.pop()
                await asyncio.sleep(max(0.0, started + spec.index * spread / len(specs) - time.monotonic()))
                outcomes.append(await run_one(http, spec, model_name))

        background = [
            asyncio.create_task(chaos(up, args.fault_every, args.short, faults, stop_event)),
            asyncio.create_task(sample_memory(up, mem, stop_event)),
        ]
        async with httpx.AsyncClient(base_url=up.base_url, timeout=args.timeout) as http:
            await asyncio.gather(*(client(http) for _ in range(args.clients)))
        wall = time.monotonic() - started
        stop_event.set()
        await asyncio.gather(*background)
        restarts = {n: p["restarts"] for n, p in up.processes().items()}
    finally:
        stop_event.set()
        up.stop()
    return report(args, specs, outcomes, faults, mem, wall, restarts, workdir)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def report(
    args: argparse.Namespace,
    specs: list[Spec],
    outcomes: list[Outcome],
    faults: list[Fault],
    mem: Memory,
    wall: float,
    restarts: dict[str, int],
    workdir: Path,
) -> dict:
    verdicts = {
        v: sum(o.verdict == v for o in outcomes) for v in ("ok", "cancelled", "lost", "duplicated", "missing", "failed")
    }
    lat = [o.latency_s for o in outcomes if o.verdict == "ok"]
    by_kind: dict[str, dict] = {}
    for kind in FAULT_KINDS:
        mine = [f for f in faults if f.kind == kind]
        ready = [f.ready_s for f in mine if f.ready_s is not None]
        by_kind[kind] = {
            "faults": len(mine),
            "recovered": len(ready),
            "ready_s_median": statistics.median(ready) if ready else None,
            "ready_s_max": max(ready) if ready else None,
        }
    peak = max(mem.peak.values()) if mem.peak else 0
    result = {
        "command": "python bench/chaos.py " + " ".join(sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "model": str(args.model),
        "requests": len(outcomes),
        "mix": {k: sum(s.kind == k for s in specs) for k in ("text", "new", "repeat")},
        "streamed": sum(s.stream for s in specs),
        "cancelled_by_client": sum(s.cancel for s in specs),
        "verdicts": verdicts,
        "client_retries": sum(o.retries for o in outcomes),
        "requests_retried": sum(o.retries > 0 for o in outcomes),
        "latency_s": {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99)},
        "wall_s": wall,
        "faults": by_kind,
        "restarts": restarts,
        "memory_mib": {
            "peak_any": peak / 2**20,
            "per_process": {
                n: {"first": mem.first[n] / 2**20, "peak": mem.peak[n] / 2**20, "last": mem.last[n] / 2**20}
                for n in sorted(mem.peak)
            },
        },
        "failures": [
            asdict(o) | {"text": o.text[:80]}
            for o in outcomes
            if o.verdict in ("lost", "duplicated", "missing", "failed")
        ][:20],
        "logs": str(workdir),
    }
    print_table(result)
    return result


def print_table(r: dict) -> None:
    v = r["verdicts"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print()
    print(
        f"requests {r['requests']} (text {r['mix']['text']}, new images {r['mix']['new']}, "
        f"repeated images {r['mix']['repeat']}; streamed {r['streamed']}, cancelled {r['cancelled_by_client']})"
    )
    print(
        f"{'ok':>6} {'cancel':>6} {'lost':>6} {'dup':>6} {'missing':>7} {'failed':>6} {'retried':>7} "
        f"{'p50 s':>7} {'p99 s':>7} {'wall s':>7}"
    )
    print(
        f"{v['ok']:>6} {v['cancelled']:>6} {v['lost']:>6} {v['duplicated']:>6} {v['missing']:>7} {v['failed']:>6} "
        f"{r['requests_retried']:>7} {fmt(r['latency_s']['p50']):>7} {fmt(r['latency_s']['p99']):>7} "
        f"{r['wall_s']:>7.0f}"
    )
    print()
    print(f"{'fault':<16} {'count':>5} {'recovered':>9} {'ready s (median)':>16} {'ready s (max)':>13}")
    for kind, f in r["faults"].items():
        print(
            f"{kind:<16} {f['faults']:>5} {f['recovered']:>9} {fmt(f['ready_s_median']):>16} "
            f"{fmt(f['ready_s_max']):>13}"
        )
    print()
    print(f"memory: peak RSS of any process {r['memory_mib']['peak_any']:.0f} MiB")
    for n, m in r["memory_mib"]["per_process"].items():
        print(f"  {n:<18} first {m['first']:>6.0f}  peak {m['peak']:>6.0f}  last {m['last']:>6.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--fault-every", type=float, default=4.0, help="seconds between faults (after recovery)")
    ap.add_argument("--short", action="store_true", help="CI: every kind of fault once first")
    ap.add_argument(
        "--duration", type=float, help="spread the requests over this many seconds (default: as fast as they go)"
    )
    ap.add_argument("--model", type=Path, default=SHIPPED)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="a client's HTTP timeout")
    ap.add_argument("--out", type=Path, help="default bench/results/chaos.json (chaos-short.json with --short)")
    args = ap.parse_args()
    if args.short and args.duration is None:  # long enough for every kind of fault, each recovered
        args.duration = 6 * (args.fault_every + 8)
    result = asyncio.run(soak(args))
    out = args.out or ROOT / "bench" / "results" / ("chaos-short.json" if args.short else "chaos.json")
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")
    bad = result["verdicts"]["lost"] + result["verdicts"]["duplicated"] + result["verdicts"]["missing"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
