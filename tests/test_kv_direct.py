"""The direct P→D KV path: grants, layer-by-layer writes on a real TransferEngine, expiry, fallbacks.

Both sides run in this process on their own TransferEngines (two segments of a real Mooncake
metadata server), talking over a real NATS server, as a prefill and a decode worker do.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import torch
from epd.connectors.kv import KVTransferError
from epd.connectors.kv_direct import DirectKVConnector, KVLanding
from epd.connectors.tensors import TensorIntegrityError
from epd.connectors.transfer_engine import Arena, TransferError, TransferLink
from epd.core.config import Settings
from epd.ops.trace_view import load_spans, spans_for_request
from epd.schemas.decode import KVPath, KVReserve
from epd.workers.kv_rooms import NatsKVRooms, serve_kv_rooms

from .conftest import MAX_NEW, chat_body, png_bytes, post, start_cluster
from .oracle import reference

SHAPE = (3, 2, 2, 37, 16)  # layers, K/V, kv heads, tokens, head dim


def kv_of(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


class Pair:
    """A decoder's landing (its grants served over NATS) and a prefill worker's sender."""

    def __init__(self, settings: Settings, ttl_s: float, decoder_mb: float, prefill_mb: float) -> None:
        self.settings, self.ttl_s, self.decoder_mb, self.prefill_mb = settings, ttl_s, decoder_mb, prefill_mb

    async def __aenter__(self) -> "Pair":
        self.nc = await nats.connect(self.settings.nats_url)
        self.landing = KVLanding(TransferLink(self.settings, self.decoder_mb), self.ttl_s)
        self.sender = DirectKVConnector(TransferLink(self.settings, self.prefill_mb), rooms=NatsKVRooms(self.nc))
        self.stop = asyncio.Event()
        self.serving = asyncio.create_task(serve_kv_rooms(self.landing, self.nc, "decoder-1", self.stop))
        await asyncio.sleep(0.1)  # subscribed
        return self

    async def __aexit__(self, *_: object) -> None:
        self.stop.set()
        await self.serving
        await self.nc.close()

    async def assert_all_freed(self) -> None:
        """The decoder's grant (released over NATS, so a moment later) and the sender's staging are free."""
        for _ in range(100):
            if self.landing.granted_bytes == 0:
                break
            await asyncio.sleep(0.02)
        assert self.landing.granted_bytes == 0 and self.sender.link.arena.used == 0

    async def send(self, kv: torch.Tensor) -> tuple[object, object]:
        writer = await self.sender.open("req-1", tuple(kv.shape), kv.dtype, "decoder-1")
        assert writer is not None
        for layer in range(kv.shape[0]):
            writer.write_layer(layer, kv[layer, 0], kv[layer, 1])
        return writer, await writer.finish()


@pytest.fixture
async def pair(infra_settings: Settings) -> AsyncIterator[Pair]:
    async with Pair(infra_settings, ttl_s=30, decoder_mb=4, prefill_mb=4) as p:
        yield p


async def test_layers_written_one_by_one_load_bit_for_bit_and_free_both_sides(pair: Pair) -> None:
    for seed in range(3):  # the ranges are reused
        kv = kv_of(seed=seed)
        writer, handle = await pair.send(kv)
        assert handle.path is KVPath.DIRECT and handle.nbytes == kv.numel() * 4
        assert pair.landing.granted_bytes == handle.nbytes  # held until loaded
        assert pair.sender.link.arena.used == 0  # staging freed once the writes landed
        loaded = await asyncio.to_thread(pair.landing.take, handle.tensor)
        assert torch.equal(loaded, kv)
        assert pair.landing.granted_bytes == 0 and pair.landing.link.arena.used == 0
        with pytest.raises(KVTransferError, match="not held"):  # loaded once; a second load is refused
            pair.landing.take(handle.tensor)


async def test_a_corrupted_landing_is_caught_by_the_checksum(pair: Pair) -> None:
    kv = kv_of()
    _, handle = await pair.send(kv)
    offset = next(iter(pair.landing._grants.values()))[0]
    pair.landing.link.buffer[offset + 100] ^= 0xFF  # one byte flipped after it landed
    with pytest.raises(TensorIntegrityError, match="checksum"):
        pair.landing.take(handle.tensor)
    assert pair.landing.granted_bytes == 0  # a failed load frees the room too


async def test_an_aborted_writer_releases_the_decoders_grant(pair: Pair) -> None:
    kv = kv_of()
    writer = await pair.sender.open("req-2", tuple(kv.shape), kv.dtype, "decoder-1")
    writer.write_layer(0, kv[0, 0], kv[0, 1])
    assert pair.landing.granted_bytes > 0
    await writer.abort()  # e.g. the request ended at its first token
    await pair.assert_all_freed()


async def test_a_forward_run_again_takes_the_store_path(pair: Pair) -> None:
    """A failed prefill batch is retried item by item: layers come again from 0, and the streamed checksum
    would not match what landed. The writer refuses, and prefill sends the KV through the store."""
    kv = kv_of()
    writer = await pair.sender.open("req-6", tuple(kv.shape), kv.dtype, "decoder-1")
    writer.write_layer(0, kv[0, 0], kv[0, 1])
    writer.write_layer(1, kv[1, 0], kv[1, 1])
    for layer in range(kv.shape[0]):  # the retry
        writer.write_layer(layer, kv[layer, 0], kv[layer, 1])
    with pytest.raises(TransferError, match="came after"):
        await writer.finish()
    await pair.assert_all_freed()


async def test_no_room_or_no_decoder_means_the_store_path(pair: Pair) -> None:
    big = (40, 2, 8, 1024, 64)  # 160 MB of float32: more than the 4 MiB buffers
    assert await pair.sender.open("req-3", big, torch.float32, "decoder-1") is None
    assert await pair.sender.open("req-4", SHAPE, torch.float32, "no-such-decoder") is None
    assert pair.sender.link.arena.used == 0 and pair.landing.granted_bytes == 0
    refused = pair.landing.reserve(KVReserve(request_id="x", nbytes=8 << 20))
    assert not refused.granted and "EPD_KV_BUFFER_MB" in refused.reason


async def test_an_unloaded_grant_expires(infra_settings: Settings) -> None:
    async with Pair(infra_settings, ttl_s=0.5, decoder_mb=4, prefill_mb=4) as p:
        kv = kv_of()
        writer = await p.sender.open("req-5", tuple(kv.shape), kv.dtype, "decoder-1")
        assert p.landing.granted_bytes > 0
        started = time.monotonic()
        while p.landing.granted_bytes and time.monotonic() - started < 5:  # the serve loop sweeps
            await asyncio.sleep(0.05)
        assert p.landing.granted_bytes == 0 and time.monotonic() - started >= 0.3
        for layer in range(kv.shape[0]):
            writer.write_layer(layer, kv[layer, 0], kv[layer, 1])
        with pytest.raises(Exception, match="expires"):  # prefill notices, and takes the store path
            await writer.finish()
        assert p.sender.link.arena.used == 0


def test_a_name_left_by_a_dead_engine_is_skipped(infra_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed without a goodbye leaves its engine's name registered; a new engine whose first
    choice of name is that one (ports are reused) takes the next one instead of failing to start."""
    import socket

    from epd.connectors import transfer_engine
    from epd.ops.infra import free_port
    from mooncake.engine import TransferEngine

    port = free_port("127.0.0.1")
    ghost = TransferEngine()
    assert ghost.initialize(f"127.0.0.1:{port}", infra_settings.mooncake_metadata, "tcp", "") == 0
    first = []

    class FirstBindOnTheGhostsPort(socket.socket):
        def bind(self, address: tuple) -> None:
            if not first:
                first.append(port)
                return super().bind((address[0], port))
            return super().bind(address)

    monkeypatch.setattr(transfer_engine.socket, "socket", FirstBindOnTheGhostsPort)
    link = TransferLink(infra_settings, 1)
    assert first == [port] and link.session != f"127.0.0.1:{port}"


def test_arena_reuses_and_merges_ranges() -> None:
    arena = Arena(64 << 10)
    a, b, c = (arena.alloc(16 << 10) for _ in range(3))
    assert (a, b, c) == (0, 16 << 10, 32 << 10) and arena.alloc(32 << 10) is None
    arena.free(b)
    assert arena.alloc(20 << 10) is None  # 16 KiB + 16 KiB are not adjacent yet
    arena.free(c)
    assert arena.alloc(32 << 10) == b  # b and c merged, with the tail
    arena.free(a)
    arena.free(a)  # twice: no-op
    assert arena.used == 32 << 10


@pytest.mark.e2e
@pytest.mark.parametrize("buffer_mb", [64, 0.001], ids=["direct", "fallback-to-store"])
async def test_e_p_d_over_the_direct_path_matches_generate(buffer_mb: float, tiny_model: Path, tmp_path: Path) -> None:
    """With room, every request's KV goes layer by layer into its decoder; without (a 1 KB buffer), through
    the store. Either way the answers are `generate`'s."""
    cluster = start_cluster(tiny_model, tmp_path, "e-p-d", {"decode": 2}, kv_buffer_mb=buffer_mb)
    try:
        image = png_bytes(size=(96, 64), color=(30, 160, 40), shape="circle")
        cases = [("What color is it?", image), ("Name three colors.", None), ("And the shape?", image)]
        responses = await asyncio.gather(*(post(cluster, chat_body(q, im)) for q, im in cases))
        for (question, im), r in zip(cases, responses, strict=True):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == reference(tiny_model, question, im, MAX_NEW)[1]
        await asyncio.sleep(1.5)  # spans are flushed
        spans = load_spans(Path(cluster.settings.trace_dir))
        for r in responses:
            sent = [s for s in spans_for_request(spans, r.json()["id"]) if s["name"] == "kv.send"]
            assert [s["attributes"]["epd.path"] for s in sent] == ["direct" if buffer_mb > 1 else "store"]
    finally:
        cluster.stop()


async def test_a_request_granted_again_frees_its_earlier_grant_soon(
    infra_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its first prefill worker died holding a grant; JetStream gave the job to another, which asks again:
    the dead one's room is freed after a short grace (here none), not at the grant's TTL."""
    from epd.connectors import kv_direct
    from epd.schemas.decode import KVReserve

    monkeypatch.setattr(kv_direct, "REGRANT_GRACE_S", 0.0)
    landing = KVLanding(TransferLink(infra_settings, 1), ttl_s=30)
    first = landing.reserve(KVReserve(request_id="r", nbytes=1000))
    other = landing.reserve(KVReserve(request_id="s", nbytes=1000))
    again = landing.reserve(KVReserve(request_id="r", nbytes=1000))
    assert first.granted and other.granted and again.granted
    assert landing.expire() == 1 and landing.granted_bytes == 2000
    landing.release(again.grant_id)
    landing.release(other.grant_id)
    assert landing.granted_bytes == 0 and landing.expire() == 0
