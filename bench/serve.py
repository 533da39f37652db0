"""A serving benchmark for any OpenAI-compatible endpoint, in the terms of `vllm bench serve`.

Workloads (`--workload`):
- `random-mm`: 1 to `--max-images` random pictures of `--image-size` per request, `--input-len` text tokens;
- `text`: text only;
- `repeated-mm`: pictures drawn from a pool of `--image-pool`, so that requests reuse them (encoder-cache hits).

Every request streams (`stream_options.include_usage`), `ignore_eos`, `--output-len` tokens, greedy. Arrivals are
Poisson at each `--request-rate` (requests/s; `inf`: all at once), capped at `--max-concurrency` in flight. For
each rate it reports TTFT, TPOT, ITL and end-to-end latency (mean, median, p50/p90/p99), request and token
throughput, and goodput under `--goodput ttft:MS tpot:MS e2el:MS`. The JSON uses `vllm bench serve`'s field
names, one object per rate; `--plot` draws TTFT and TPOT against the rate (matplotlib).

    python bench/serve.py --base-url http://127.0.0.1:8000 --model epd-demo-qwen2-vl \\
        --workload random-mm --num-prompts 200 --request-rate 1 2 4 inf --goodput ttft:2000 tpot:100
    python bench/serve.py --launch e-p-d --num-prompts 50 ...    # start a local `epd up` cluster for the run

Text prompts are random token ids of `--tokenizer` (a checkpoint directory; the launched model's by default),
decoded and cut to `--input-len` tokens, so the lengths are exact for that tokenizer and no two prompts share a
prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

OUT = Path(__file__).resolve().parent / "results" / "serve.json"
WORDS = "the a shape color image red green blue circle square triangle small large bright over under near".split()


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool = False
    ttft: float = 0.0  # seconds to the first content token
    itl: list[float] = field(default_factory=list)  # seconds between content chunks
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    error: str = ""
    id: str = ""  # the response's id (epd's request id: its spans carry it)

    @property
    def tpot(self) -> float:
        """Time per output token after the first (0 for a single token)."""
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def picture_url(rng: random.Random, size: int) -> str:
    from PIL import Image  # noqa: PLC0415 - only the image workloads need it

    pixels = bytes(rng.getrandbits(8) for _ in range(3 * 32 * 32))  # random, so every picture is new to the cache
    image = Image.frombytes("RGB", (32, 32), pixels).resize((size, size))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Prompts:
    """Request bodies of a workload, drawn from one seeded generator."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rng = args, random.Random(args.seed)
        self.tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer  # noqa: PLC0415

            self.tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
            added = set(self.tokenizer.get_added_vocab().values())  # special and control tokens
            self.ordinary = [i for i in range(len(self.tokenizer)) if i not in added]
        self.pool = [picture_url(self.rng, args.image_size) for _ in range(args.image_pool)]

    def text(self) -> str:
        """`--input-len` tokens: random ordinary ids decoded, encoded again and cut (as `vllm bench serve`'s random
        dataset does), so that no two prompts share a prefix; random words without a tokenizer."""
        n = self.args.input_len
        if self.tokenizer is None:
            return " ".join(self.rng.choice(WORDS) for _ in range(n))
        ids = [self.rng.choice(self.ordinary) for _ in range(n)]
        ids = self.tokenizer(self.tokenizer.decode(ids), add_special_tokens=False).input_ids[:n]
        return self.tokenizer.decode(ids)

    def body(self) -> dict:
        """The workload's next request."""
        a = self.args
        text, urls = self.text(), []
        if a.workload != "text":
            n = self.rng.randint(1, a.max_images)
            urls = (
                [self.rng.choice(self.pool) for _ in range(n)]
                if a.workload == "repeated-mm"
                else [picture_url(self.rng, a.image_size) for _ in range(n)]
            )
        return self.request(urls, a.output_len, text)

    def request(self, urls: list[str], max_tokens: int, text: str | None = None) -> dict:
        """A streamed greedy request of the pictures at `urls`, then `text` (a new prompt if None), for exactly
        `max_tokens` tokens (`ignore_eos`)."""
        content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        content.append({"type": "text", "text": self.text() if text is None else text})
        return {
            "model": self.args.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


class Client:
    """Streamed chat completions to one endpoint, timed by the client.

    Over plain HTTP it speaks HTTP/1.1 on asyncio's streams itself (a connection per request): a streamed chunk
    costs it 84-100 us of CPU against httpx's 236-265 us (`bench/stream_client_cost.py`, 2 vCPUs), which at
    thousands of tokens per second is the difference between a client that keeps up and one that does not.
    HTTPS goes through httpx."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.url, self.timeout = urllib.parse.urlsplit(base_url), timeout
        self.base_url = base_url
        self._httpx: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Client:
        if self.url.scheme != "http":
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            self._httpx = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, limits=limits)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._httpx is not None:
            await self._httpx.aclose()

    async def send(self, body: dict) -> Result:
        res, started = Result(), time.perf_counter()
        try:
            events = self._events(body) if self._httpx is None else self._events_httpx(body)
            await asyncio.wait_for(_read(res, started, events), self.timeout)
            res.latency, res.ok = time.perf_counter() - started, True
        except (OSError, ValueError, EOFError, asyncio.TimeoutError, httpx.HTTPError, HTTPStatus) as e:
            res.error = f"{type(e).__name__}: {e}"
        return res

    async def _events(self, body: dict) -> AsyncIterator[bytes]:
        """The `data:` payloads of the response, over a raw HTTP/1.1 connection."""
        host, port = self.url.hostname or "127.0.0.1", self.url.port or 80
        payload = json.dumps(body).encode()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            head = f"POST {self.url.path.rstrip('/')}/v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + payload)
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if status != 200:
                raise HTTPStatus(f"HTTP {status}: {(await reader.read(200)).decode(errors='replace')}")
            buf = b""
            async for piece in _body(reader, headers.get("transfer-encoding", "") == "chunked"):
                buf += piece
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if line.startswith(b"data: "):
                            yield line[6:]
        finally:
            writer.close()

    async def _events_httpx(self, body: dict) -> AsyncIterator[bytes]:
        assert self._httpx is not None
        async with self._httpx.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise HTTPStatus(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    yield line[6:].encode()


class HTTPStatus(Exception):
    """The endpoint answered with another status than 200."""


async def _body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """A response body as it arrives: its chunks (chunked transfer coding), or reads until the connection closes."""
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def _read(res: Result, started: float, events: AsyncIterator[bytes]) -> None:
    """Fill `res` from the stream's events: the first content token's time, the gaps between chunks, usage."""
    last = started
    async for data in events:
        if data == b"[DONE]":
            continue
        chunk = json.loads(data)
        res.id = res.id or chunk.get("id", "")
        if chunk.get("usage"):
            res.prompt_tokens = chunk["usage"]["prompt_tokens"]
            res.output_tokens = chunk["usage"]["completion_tokens"]
        if "error" in chunk:
            raise ValueError(f"error in the stream: {chunk['error']}")
        for choice in chunk.get("choices", []):
            if choice.get("finish_reason") == "error":
                raise ValueError("the stream finished with an error")
            delta = choice.get("delta", {}).get("content") or ""
            if not delta:
                continue
            now = time.perf_counter()
            if not res.text:
                res.ttft = now - started
            else:
                res.itl.append(now - last)
            last, res.text = now, res.text + delta


async def run_rate(base_url: str, bodies: list[dict], rate: float, args: argparse.Namespace) -> tuple[list, float]:
    """Every body sent with Poisson arrivals at `rate`/s (all at once for inf); (results, seconds)."""
    rng, limit = random.Random(args.seed + 1), asyncio.Semaphore(args.max_concurrency or len(bodies))
    done = [0]

    async def one(client: Client, body: dict) -> Result:
        async with limit:
            res = await client.send(body)
        done[0] += 1
        bar = "#" * (30 * done[0] // len(bodies))
        print(f"\r  rate {rate:>5}: [{bar:<30}] {done[0]}/{len(bodies)}", end="", file=sys.stderr, flush=True)
        return res

    async with Client(base_url, args.timeout) as client:
        tasks, started = [], time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.create_task(one(client, body)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    print(file=sys.stderr)
    return results, time.perf_counter() - started


def percentiles(name: str, values: list[float], pcts: list[int]) -> dict:
    """vllm bench serve's keys for one metric, in milliseconds."""
    ms = sorted(1e3 * v for v in values) or [0.0]
    out = {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms)}
    out[f"std_{name}_ms"] = statistics.pstdev(ms)
    for p in pcts:
        out[f"p{p}_{name}_ms"] = ms[min(len(ms) - 1, max(0, math.ceil(p / 100 * len(ms)) - 1))]
    return out


def meets(res: Result, slo: dict[str, float]) -> bool:
    got = {"ttft": res.ttft, "tpot": res.tpot, "e2el": res.latency}
    return res.ok and all(1e3 * got[k] <= limit for k, limit in slo.items())


def summarize(results: list[Result], seconds: float, rate: float, args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens, in_tokens = sum(r.output_tokens for r in ok), sum(r.prompt_tokens for r in ok)
    pcts = [50, 90, 99]
    summary: dict[str, Any] = {
        "backend": "openai-chat",
        "model_id": args.model,
        "workload": args.workload,
        "num_prompts": len(results),
        "request_rate": rate if math.isfinite(rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "duration": seconds,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / seconds,
        "request_goodput": sum(meets(r, args.slo) for r in results) / seconds if args.slo else None,
        "output_throughput": out_tokens / seconds,
        "total_token_throughput": (in_tokens + out_tokens) / seconds,
    }
    summary |= percentiles("ttft", [r.ttft for r in ok], pcts)
    summary |= percentiles("tpot", [r.tpot for r in ok if r.output_tokens > 1], pcts)
    summary |= percentiles("itl", [t for r in ok for t in r.itl], pcts)
    summary |= percentiles("e2el", [r.latency for r in ok], pcts)
    summary |= {
        "input_lens": [r.prompt_tokens for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "errors": [r.error for r in results],
    }
    return summary


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ttft, tpot) = plt.subplots(1, 2, figsize=(10, 4))
    by_label: dict[str, list[dict]] = {}
    for run in runs:
        by_label.setdefault(run.get("label") or run["workload"], []).append(run)
    for label, group in by_label.items():
        rates = [r["request_throughput"] for r in group]  # achieved, so `inf` has a place on the axis
        ttft.plot(rates, [r["p99_ttft_ms"] for r in group], marker="o", label=f"{label} p99")
        ttft.plot(rates, [r["median_ttft_ms"] for r in group], marker=".", linestyle="--", label=f"{label} p50")
        tpot.plot(rates, [r["p99_tpot_ms"] for r in group], marker="o", label=f"{label} p99")
        tpot.plot(rates, [r["median_tpot_ms"] for r in group], marker=".", linestyle="--", label=f"{label} p50")
    for ax, name in ((ttft, "TTFT (ms)"), (tpot, "TPOT (ms)")):
        ax.set_xlabel("requests/s completed")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def parse_slo(items: list[str]) -> dict[str, float]:
    slo = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, not {item!r}")
        slo[key] = float(value)
    return slo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--launch", choices=["epd", "e-pd", "e-p-d"], help="start a local cluster (`epd up`) for the run")
    p.add_argument("--model", default=None, help="the served model name (default: the launched model's)")
    p.add_argument("--model-dir", type=Path, default=None, help="checkpoint to launch (default: the demo model)")
    p.add_argument("--tokenizer", type=Path, default=None, help="checkpoint whose tokenizer cuts the prompts")
    p.add_argument("--workload", choices=["random-mm", "text", "repeated-mm"], default="random-mm")
    p.add_argument("--label", default="", help="the run's name in the plot (e.g. the topology)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf])
    p.add_argument("--max-concurrency", type=int, default=0, help="requests in flight at most (0: no cap)")
    p.add_argument("--input-len", type=int, default=400)
    p.add_argument("--output-len", type=int, default=150)
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--image-pool", type=int, default=8)
    p.add_argument("--goodput", nargs="*", default=[], help="SLOs: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--plot", type=Path, default=None, help="PNG of TTFT and TPOT against the rate")
    args = p.parse_args(argv)
    args.slo = parse_slo(args.goodput)
    return args


async def bench(args: argparse.Namespace) -> list[dict]:
    runs = []
    for rate in args.request_rate:
        prompts = Prompts(args)  # the same bodies at every rate
        bodies = [prompts.body() for _ in range(args.num_prompts)]
        results, seconds = await run_rate(args.base_url, bodies, rate, args)
        run = summarize(results, seconds, rate, args) | {"label": args.label}
        runs.append(run)
        print(
            f"rate {rate}: {run['completed']}/{run['num_prompts']} ok, {run['request_throughput']:.2f} req/s, "
            f"{run['output_throughput']:.1f} out tok/s, TTFT p50/p99 {run['median_ttft_ms']:.0f}/"
            f"{run['p99_ttft_ms']:.0f} ms, TPOT p50/p99 {run['median_tpot_ms']:.1f}/{run['p99_tpot_ms']:.1f} ms"
            + (f", goodput {run['request_goodput']:.2f} req/s" if args.slo else ""),
            flush=True,
        )
    return runs


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    cluster = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.launch:
            from epd.ops.up import Cluster  # noqa: PLC0415
            from epd.tools.demo_model import SHIPPED  # noqa: PLC0415 - only a launched run needs the project

            model_dir = args.model_dir or SHIPPED
            cluster = Cluster.local(model_dir, Path(tmp), args.launch, mooncake_segment_mb=64)
            args.base_url, args.model = cluster.base_url, args.model or cluster.settings.model_name
            args.tokenizer, args.label = args.tokenizer or model_dir, args.label or args.launch
        if not args.model:
            raise SystemExit("--model is needed unless --launch names a topology")
        try:
            runs = asyncio.run(bench(args))
        finally:
            if cluster is not None:
                cluster.stop()
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} vCPU"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y%m%d-%H%M%S"), "machine": machine, "runs": runs}) + "\n")
    print(f"wrote {args.out}")
    if args.plot:
        plot(runs, args.plot)
        print(f"wrote {args.plot}")
    return runs


if __name__ == "__main__":
    main()
