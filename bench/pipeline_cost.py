"""The pipeline's own cost in TTFT, split per hop, from epd's own spans (issue 21: target ≤ 5 ms at low load).

For each request, the TTFT window is the gateway's `ttft` span: from the gateway opening the request's reply
stream (in `submit`, before routing; the instant `epd.ttft_ms` counts from) to the gateway reading its first
token. Every instant of that window is given to exactly one part, so the parts add up to `ttft_ms` exactly:

- **engine**: the engine's compute, the `images.decode` span (the encoder's decode of the picture's bytes
  into pixels, which an engine in one process does too), the `encode` span (the encoder's batcher:
  preprocessing and the vision forward) and the `prefill.forward` span (the prefill batcher: the forward that
  gives the first token's logits; with the direct KV path, the layer-by-layer KV writes started inside it are
  counted here too).
- **mooncake**: `ec.exists` (the gateway's and the encoder's cache look-ups), `ec.save`, `ec.load`, `ec.wait`,
  `kv.send`, `kv.recv`. (In epd and e-pd, `ec.*` is the in-process cache's: tens of µs, no Mooncake.)
- **nats**: `publish <stage>` (encoding a job and JetStream's storing ack), `queue <stage>` (stored to fetched),
  `claims.claim` and `claims.release` (the encode claims, a JetStream key-value bucket),
  the gap from a queue span's end to its consumer span's start (the fetched job's decode), `images.put` and
  `images.get` (the image bytes in the JetStream object store), `kv.reserve` (direct KV: prefill's NATS
  request for room on a decoder, no bytes through Mooncake), and the reply leg: from prefill's `reply.first`
  span starting (the first token's chunk published on core NATS) to the window's end (the gateway reading it).
- **worker**: the rest of a worker's stage span (`<stage> <subject>`): the job's checks, the prompt's
  tokenization, sampling the first token, building its chunk.
- **gateway**: the rest of the gateway's own spans (`route`: the request's checks, image checks off the
  event loop (header and structure, core/images.check_image), the routing policy, the encode jobs' building).
- **other**: what no span covers: between the window's start and `route` (subscribing the reply inbox),
  and any scheduling gap between spans.

Where spans overlap, the first part in this order takes the instant: the reply leg, engine, mooncake, nats,
worker, gateway (within a part, the span that started last: a publish's ack overlaps its job's queue span,
which takes the overlap). The reply leg comes first because once the first token is published, what the prefill worker
does next (`kv.send`, the decode hand-off) is off the TTFT path; spans wholly after the window (decode's steps)
do not count. `engine_ms` is the engine part, `pipeline_ms = ttft_ms - engine_ms` the sum of the five others.
The gateway's work before its TTFT clock starts (FastAPI's body parsing aside: the request's conversion, data
URLs decoded) is `before_ms`, outside `ttft_ms`; the client's own TTFT is measured beside it by `measure`.

All processes' spans are on one clock (`time.time_ns`): the split is exact on one host; across hosts it is
off by their clocks' skew.

    .venv/bin/python bench/pipeline_cost.py [--topology e-p-d] [--requests 20]

launches `Cluster.local` on the demo model (CPU), sends image and text requests one at a time, prints a table
and writes bench/results/pipeline_cost.json. On a GPU, a driver calls `measure` against its own cluster.
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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx

ENGINE = frozenset({"images.decode", "encode", "prefill.forward"})
MOONCAKE = frozenset({"ec.exists", "ec.save", "ec.load", "ec.wait", "kv.send", "kv.recv"})
NATS_NAMES = frozenset({"images.put", "images.get", "kv.reserve"})
NATS_PREFIXES = ("publish ", "queue ", "claims.")
HOPS = ("gateway", "nats", "mooncake", "worker", "other")
# a part's rank when spans overlap: the lowest takes the instant
RANK = {"reply": 0, "engine": 1, "mooncake": 2, "nats": 3, "worker": 4, "gateway": 5}
GATEWAY_WINDOW = frozenset({"ttft", "reply"})  # the gateway's spans that span the whole request: not a part


def _part(span: dict, gateway: tuple) -> str:
    name = span["name"]
    if name in ENGINE:
        return "engine"
    if name in MOONCAKE:
        return "mooncake"
    if name in NATS_NAMES or name.startswith(NATS_PREFIXES):
        return "nats"
    return "gateway" if (span["service"], span["pid"]) == gateway else "worker"


def _split(window: tuple[int, int], pieces: list[tuple[int, int, str, str]]) -> dict[str, dict[str, int]]:
    """Nanoseconds of `window` per part and, within it, per piece's label: each instant to the lowest-ranked
    piece covering it (among equals, the one that started last: the innermost), else to 'other'."""
    lo, hi = window
    clipped = [(max(a, lo), min(b, hi), p, label) for a, b, p, label in pieces if min(b, hi) > max(a, lo)]
    cuts = sorted({lo, hi, *(c[0] for c in clipped), *(c[1] for c in clipped)})
    out: dict[str, dict[str, int]] = {part: {} for part in ("engine", *HOPS)}
    for a, b in zip(cuts, cuts[1:], strict=False):
        covering = [(RANK[p], -s, i, p, label) for i, (s, e, p, label) in enumerate(clipped) if s <= a and e >= b]
        *_, part, label = min(covering) if covering else (0, 0, 0, "other", "no span")
        part = "nats" if part == "reply" else part
        out[part][label] = out[part].get(label, 0) + b - a
    return out


def _row(group: list[dict]) -> dict | None:
    """The breakdown of one trace, or None without a TTFT window (a failed request, not yet flushed)."""
    ttft = next((s for s in group if s["name"] == "ttft"), None)
    if ttft is None:
        return None
    by_id = {s["span_id"]: s for s in group}
    root = by_id.get(ttft["parent_id"])
    gateway = (ttft["service"], ttft["pid"])
    window = (ttft["start_ns"], ttft["end_ns"])
    parts = [s for s in group if s is not root and s["name"] not in GATEWAY_WINDOW]
    pieces = [(s["start_ns"], s["end_ns"], _part(s, gateway), s["name"]) for s in parts]
    for q in (s for s in group if s["name"].startswith("queue ")):
        # the fetched job, until its stage span starts in the same process
        consumers = [
            s
            for s in group
            if s["pid"] == q["pid"]
            and s["attributes"].get("epd.stage") == q["attributes"].get("epd.stage")
            and not s["name"].startswith("queue ")
            and s["start_ns"] >= q["end_ns"]
        ]
        if consumers:
            stage = q["name"].removeprefix("queue ")
            pieces.append((q["end_ns"], min(s["start_ns"] for s in consumers), "nats", f"fetched {stage}"))
    sent = [s["start_ns"] for s in group if s["name"] == "reply.first" and s["start_ns"] <= window[1]]
    if sent:
        pieces.append((max(sent), window[1], "reply", "reply leg"))
    split = _split(window, pieces)
    ms = {part: sum(labels.values()) / 1e6 for part, labels in split.items()}
    ttft_ms = (window[1] - window[0]) / 1e6

    return {
        "request_id": ttft["attributes"].get("epd.request_id", ""),
        "trace_id": ttft["trace_id"],
        "ttft_ms": ttft_ms,
        "gateway_ttft_ms": root["attributes"].get("epd.ttft_ms") if root else None,
        "before_ms": (window[0] - root["start_ns"]) / 1e6 if root else None,
        "images": sum(s["attributes"].get("epd.images", 0) for s in group if s["name"] == "route"),
        "engine_ms": ms["engine"],
        "decode_ms": split["engine"].get("images.decode", 0) / 1e6,
        "encode_ms": split["engine"].get("encode", 0) / 1e6,
        "prefill_ms": split["engine"].get("prefill.forward", 0) / 1e6,
        "pipeline_ms": ttft_ms - ms["engine"],
        "hops_ms": {h: ms[h] for h in HOPS},
        "detail_ms": {h: {label: v / 1e6 for label, v in split[h].items()} for h in HOPS},
    }


def breakdown(spans: list[dict]) -> list[dict]:
    """One row per request trace that has a TTFT window (module doc), in the order the requests came:
    `request_id`, `ttft_ms`, `engine_ms` (of it `decode_ms`, `encode_ms`, `prefill_ms`), `pipeline_ms` = `ttft_ms -
    engine_ms`, `hops_ms` {gateway, nats, mooncake, worker, other} adding up to `pipeline_ms` (`detail_ms`: each
    hop per span name, plus 'fetched <stage>', 'reply leg' and 'no span'), `images`,
    `before_ms` and the gateway's own `gateway_ttft_ms` (rounded to µs; perf_counter, not the spans' clock)."""
    traces: dict[str, list[dict]] = {}
    for s in spans:
        traces.setdefault(s["trace_id"], []).append(s)
    rows = [r for group in traces.values() if (r := _row(group)) is not None]
    return sorted(rows, key=lambda r: min(s["start_ns"] for s in traces[r["trace_id"]]))


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, max(0, -(-9 * len(ordered) // 10) - 1))]  # nearest rank
    return {"p50": round(statistics.median(ordered), 3), "p90": round(p90, 3)}


def summarize(rows: list[dict]) -> dict:
    """Median and p90 (nearest rank) of each figure over `rows`, in ms; `n` rows. With the client's TTFT (rows
    from `measure`), `http_ms` is the client's TTFT less the gateway's: the HTTP stack both ways and the client."""
    if not rows:
        return {"n": 0}
    out: dict = {"n": len(rows)}
    for key in ("ttft_ms", "engine_ms", "decode_ms", "encode_ms", "prefill_ms", "pipeline_ms"):
        out[key] = _stats([r[key] for r in rows])
    out["hops_ms"] = {h: _stats([r["hops_ms"][h] for r in rows]) for h in HOPS}
    # within each hop, the median of each span's share (0 where a request has none): where to look first
    labels = {h: sorted({label for r in rows for label in r["detail_ms"][h]}) for h in HOPS}
    out["detail_p50_ms"] = {
        h: {label: round(statistics.median(r["detail_ms"][h].get(label, 0.0) for r in rows), 3) for label in labels[h]}
        for h in HOPS
    }
    if all(r.get("client_ttft_ms") is not None for r in rows):
        out["client_ttft_ms"] = _stats([r["client_ttft_ms"] for r in rows])
        out["http_ms"] = _stats([r["client_ttft_ms"] - r["ttft_ms"] for r in rows])
    before = [r["before_ms"] for r in rows if r["before_ms"] is not None]
    if before:
        out["before_ms"] = _stats(before)
    return out


def _complete(group: list[dict], image: bool) -> bool:
    """The trace holds every span the TTFT path writes. A process writes a span when it ends (every 200 ms), a
    parent after its children: with no span but the root missing its parent, each process's part is whole."""
    names = {s["name"] for s in group}
    ids = {s["span_id"] for s in group}
    roots = [s for s in group if s["parent_id"] not in ids]
    return (
        {"ttft", "prefill.forward", "reply.first"} <= names
        and (not image or "encode" in names)
        and len(roots) == 1
        and roots[0]["parent_id"] is None
    )


class SpanTail:
    """The spans written under a trace directory since this was made: each file read on from where it was
    left, whole lines only (a long benchmark's files before it are not read again)."""

    def __init__(self, trace_dir: Path) -> None:
        self.dir = Path(trace_dir)
        self._at = {f: f.stat().st_size for f in self.dir.glob("*.jsonl")}
        self.spans: list[dict] = []

    def read(self) -> list[dict]:
        for f in sorted(self.dir.glob("*.jsonl")):
            with f.open("rb") as fh:
                fh.seek(self._at.get(f, 0))
                data = fh.read()
            whole = data[: data.rfind(b"\n") + 1]  # a line being written waits for the next read
            self._at[f] = self._at.get(f, 0) + len(whole)
            self.spans += [json.loads(line) for line in whole.splitlines() if line.strip()]
        return self.spans


async def request(client: httpx.AsyncClient, model: str, text: str, image_url: str | None, max_tokens: int) -> tuple:
    """One streamed chat request; (its request id, the client's TTFT in ms: to the first chunk with text, or the
    finish if none has any)."""
    content: list[dict] = [{"type": "text", "text": text}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started, first, rid = time.perf_counter(), None, ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            rid = chunk.get("id", rid)
            choices = chunk.get("choices", ())
            if first is None and any(c.get("delta", {}).get("content") or c.get("finish_reason") for c in choices):
                first = time.perf_counter()
    return rid, None if first is None else (first - started) * 1e3


async def measure(
    base_url: str,
    model: str,
    trace_dir: Path,
    n: int,
    image_url_fn: Callable[[int], str] | None = None,
    max_tokens: int = 2,
    warmup: int = 2,
    flush_timeout_s: float = 15.0,
) -> dict:
    """Send `n` chat requests one at a time (low load) to an epd gateway at `base_url` serving `model`, whose
    processes write spans under `trace_dir` (a `Cluster`'s `settings.trace_dir`), then split their TTFT.

    `image_url_fn(i)`: request i's image as a URL (a data: URL); give a new image each time so that encode
    runs. None: text-only requests. `warmup` requests go first and are not counted. Waits up to
    `flush_timeout_s` for the requests' spans; returns `summarize` of the complete ones, with `incomplete`
    (requests whose spans did not all arrive) and `rows` (each request's breakdown)."""
    sent: dict[str, float | None] = {}
    tail = SpanTail(trace_dir)
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        for i in range(-warmup, n):  # (warm-up images: i < 0, never one of the measured ones)
            url = image_url_fn(i) if image_url_fn else None
            rid, client_ms = await request(client, model, f"Describe it, number {i}.", url, max_tokens)
            if i >= 0:
                sent[rid] = client_ms
    deadline = time.monotonic() + flush_timeout_s
    while True:
        spans = tail.read()
        rows = {r["request_id"]: r for r in breakdown(spans) if r["request_id"] in sent}
        traces = {r["trace_id"] for r in rows.values()}
        groups: dict[str, list[dict]] = {}
        for s in spans:
            if s["trace_id"] in traces:
                groups.setdefault(s["trace_id"], []).append(s)
        done = [r for r in rows.values() if _complete(groups[r["trace_id"]], image_url_fn is not None)]
        if len(done) == len(sent) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    for r in done:
        r["client_ttft_ms"] = sent[r["request_id"]]
    out = summarize(done)
    out["incomplete"] = len(sent) - len(done)
    out["rows"] = done
    return out


def picture_url(i: int, size: int = 448) -> str:
    """A new PNG for each `i` (random shapes), as a data URL."""
    from epd.tools import shapes

    buf = io.BytesIO()
    shapes.draw(random.Random(f"pipeline-cost-{i}"), size=(size, size)).image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def table(name: str, summary: dict) -> str:
    if not summary.get("n"):
        return f"{name}: no complete request"
    cells = [("ttft", summary["ttft_ms"]), ("engine", summary["engine_ms"]), ("decode", summary["decode_ms"])]
    cells.append(("pipeline", summary["pipeline_ms"]))
    cells += [(h, summary["hops_ms"][h]) for h in HOPS]
    if "client_ttft_ms" in summary:
        cells.append(("client", summary["client_ttft_ms"]))
    head = f"{name:<14} n={summary['n']:<4}" + "".join(f"{c:>10}" for c, _ in cells)
    p50 = f"{'  p50 ms':<21}" + "".join(f"{v['p50']:>10.2f}" for _, v in cells)
    p90 = f"{'  p90 ms':<21}" + "".join(f"{v['p90']:>10.2f}" for _, v in cells)
    lines = [head, p50, p90]
    for h in ("gateway", "nats", "mooncake", "worker"):
        parts = sorted(summary["detail_p50_ms"][h].items(), key=lambda kv: -kv[1])
        lines.append(f"  {h} p50 by span: " + ", ".join(f"{label} {v:.2f}" for label, v in parts if v >= 0.01))
    return "\n".join(lines)


async def run_topology(topology: str, model: Path, requests: int, workdir: Path) -> dict:
    from epd.ops.up import Cluster

    cluster = Cluster.local(model, workdir, topology, mooncake_segment_mb=64)
    try:
        s = cluster.settings
        out = {}
        for kind, fn in (("image", picture_url), ("text", None)):
            got = await measure(cluster.base_url, s.model_name, Path(s.trace_dir), requests, fn)
            got.pop("rows")
            out[kind] = got
            print(table(f"{topology} {kind}", got), flush=True)
        return out
    finally:
        cluster.stop()


async def main() -> None:
    from epd.tools.demo_model import SHIPPED

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", action="append", help="e-p-d, e-pd or epd; repeat for several (default: all three)")
    p.add_argument("--requests", type=int, default=20, help="requests of each kind (image, text-only)")
    p.add_argument("--model", type=Path, default=SHIPPED)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipeline_cost.json")
    args = p.parse_args()
    topologies = args.topology or ["e-p-d", "e-pd", "epd"]
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} vCPU, {platform.node()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model.name,
        "requests": args.requests,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for topology in topologies:
            results[topology] = await run_topology(topology, args.model, args.requests, Path(tmp) / topology)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
