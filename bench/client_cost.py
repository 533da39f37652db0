"""CPU a load client spends a request: httpx against bench/http_load.py, on a server that answers 429 at once
(uvicorn, in its own process), so that what is measured is the client's own `time.process_time()`.

    .venv/bin/python bench/client_cost.py [--requests 3000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_load  # noqa: E402
from epd.ops.processes import free_port, wait_until  # noqa: E402

SERVER = """
import sys, uvicorn
BODY = b'{"error": {"message": "busy", "type": "rate_limit_error"}}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-length", str(len(BODY)).encode()), (b"retry-after", b"1")]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}], "max_tokens": 48}


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/").status_code == 429
    except httpx.HTTPError:
        return False


async def cost(send, n: int, concurrency: int) -> float:  # noqa: ANN001 - a coroutine function
    started = time.process_time()
    for _ in range(0, n, concurrency):
        await asyncio.gather(*(send() for _ in range(concurrency)))
    return (time.process_time() - started) / n


async def main(n: int, concurrency: int, port: int) -> dict:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
        with_httpx = await cost(lambda: client.post("/v1/chat/completions", json=BODY), n, concurrency)
    pool = http_load.Pool("127.0.0.1", port)
    raw = http_load.post_bytes("127.0.0.1", port, "/v1/chat/completions", json.dumps(BODY).encode())
    with_raw = await cost(lambda: pool.request(raw, 30.0), n, concurrency)
    pool.close()
    return {"httpx_ms": with_httpx * 1e3, "http_load_ms": with_raw * 1e3}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=50)
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        wait_until(lambda: _up(port), 30, "server", server)
        r = asyncio.run(main(args.requests, args.concurrency, port))
        print(f"client CPU a request: httpx {r['httpx_ms']:.3f} ms, bench/http_load.py {r['http_load_ms']:.3f} ms")
    finally:
        server.terminate()
        server.wait(10)
