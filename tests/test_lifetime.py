"""Nothing leaks: after 1,000 requests the stores and the decoders' reservations are back at their baseline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from epd.connectors.kv_mooncake import KEY_PREFIX
from epd.connectors.mooncake_store import MooncakeStore
from epd.ops.status_view import gather_status

from .conftest import chat_body, png_bytes, start_cluster

pytestmark = pytest.mark.e2e
REQUESTS, CLIENTS = 1000, 16


async def test_after_1000_requests_kv_blocks_reservations_and_the_cache_are_back_to_baseline(
    tiny_model: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "ec"
    capacity_mb = 0.05  # room for a few dozen of the tiny model's embeddings: eviction runs all along
    cluster = start_cluster(
        tiny_model, tmp_path / "c", "e-p-d", ec_backend="shared-dir", ec_dir=str(shared), ec_capacity_mb=capacity_mb
    )
    store = MooncakeStore(cluster.settings)
    try:
        workers, _ = await gather_status(cluster.settings.nats_url)
        decoders = [w for w in workers if w.role == "decode"]
        assert decoders and all(w.kv_tokens == 0 for w in decoders)  # the baseline
        bodies = [
            chat_body(
                "What color is the shape?", png_bytes(size=(56 + i % 97, 60), color=(i % 256, 90, 30)), max_tokens=3
            )
            if i % 4 == 0  # 250 image requests, about a hundred distinct pictures
            else chat_body(f"Count to {i}.", max_tokens=3)
            for i in range(REQUESTS)
        ]
        ids: list[str] = []
        queue = list(range(REQUESTS))

        async def client(http: httpx.AsyncClient) -> None:
            while queue:
                r = await http.post("/v1/chat/completions", json=bodies[queue.pop()])
                assert r.status_code == 200, r.text
                ids.append(r.json()["id"])

        async with httpx.AsyncClient(base_url=cluster.base_url, timeout=120) as http:
            await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        assert len(ids) == REQUESTS

        deadline = time.monotonic() + 30  # heartbeats are a second apart (later under load); KV leases a few
        while True:
            workers, queues = await gather_status(cluster.settings.nats_url)
            reserved = [(w.kv_tokens, w.kv_granted_bytes) for w in workers if w.role == "decode"]
            active = sum(w.active for w in workers)
            kv_left = sum(await store.exists([KEY_PREFIX + rid for rid in ids]))
            served = sum(w.served for w in workers if w.role == "decode")  # as of each decoder's last beat
            if reserved == [(0, 0)] * len(decoders) and active == 0 and kv_left == 0 and served >= REQUESTS:
                break
            assert time.monotonic() < deadline, (reserved, active, kv_left, served, queues)
            await asyncio.sleep(0.5)
        # the KV went straight into the decoders' memory (a request that ends at its first token needs none)
        assert sum(w.kv_grants for w in workers if w.role == "decode") >= 0.9 * REQUESTS
        usage = sum(f.stat().st_size for f in shared.glob("*.safetensors"))
        assert 0 < usage <= capacity_mb * 2**20  # the bounded cache stayed bounded
        assert not list(shared.glob(".*.tmp"))  # and no half-written entry is left behind
    finally:
        store.close()
        cluster.stop()
