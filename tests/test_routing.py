"""Routing when the pool is not whole: with no encoder alive, prefill encodes inline, or the client
gets a clear 503 when that is turned off (text keeps being served either way)."""

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from epd.ops.processes import free_port, spawn, stop
from epd.ops.trace_view import load_spans, spans_for_request
from epd.ops.up import Cluster

from .conftest import chat_body, png_bytes, post, start_cluster
from .oracle import reference

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def no_encoders(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tiny_model, tmp_path_factory.mktemp("no-encoders"), "e-p-d", counts={"encode": 0})
    yield c
    c.stop()


async def test_no_encoder_alive_prefill_encodes_inline(no_encoders: Cluster, tiny_model: Path) -> None:
    image = png_bytes(size=(90, 60), color=(250, 120, 0), shape="circle")
    _, expected = reference(tiny_model, "What color is the shape?", image, 12)
    r = await post(no_encoders, chat_body("What color is the shape?", image))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
    for _ in range(50):  # each process flushes on its own: wait for both spans read below
        spans = spans_for_request(load_spans(Path(no_encoders.settings.trace_dir)), r.json()["id"])
        if {"encode", "route"} <= {s["name"] for s in spans}:
            break
        await asyncio.sleep(0.2)
    assert {s["service"] for s in spans if s["name"] == "encode"} == {"epd-prefill"}
    route = next(s for s in spans if s["name"] == "route")["attributes"]
    assert route["epd.encode_inline"] is True and route["epd.route"] == "prefill"


async def test_inline_encoding_off_is_a_clear_503_for_images_only(no_encoders: Cluster, tmp_path: Path) -> None:
    port = free_port()
    settings = no_encoders.settings.replace(port=port, inline_encode=False, pool_grace_s=0.5)
    gateway = spawn([*no_encoders.cli_argv, "gateway"], tmp_path / "gateway.log", env=settings.env())
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)  # past the grace period, with the pool read at least once
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            image = await client.post("/v1/chat/completions", json=chat_body("Color?", png_bytes(size=(40, 40))))
            assert image.status_code == 503 and image.headers["retry-after"] == "5"
            assert "no live encode worker" in image.json()["error"]["message"]
            text = await client.post("/v1/chat/completions", json=chat_body("Just text."))
            assert text.status_code == 200
            ready = (await client.get("/ready")).json()
            assert ready["ready"] is False and ready["workers"]["encode"] == 0
    finally:
        stop([gateway])


@pytest.mark.parametrize("cluster", ["e-p-d"], indirect=True)
async def test_a_decoder_added_mid_run_takes_load(cluster: Cluster) -> None:
    from epd.ops.status_view import gather_status

    extra = cluster.add_worker("decode", 1)
    try:
        for _ in range(300):  # it loads the model, then beats
            workers, _ = await gather_status(cluster.settings.nats_url)
            if any(w.pid == extra.pid for w in workers):
                break
            assert extra.poll() is None, f"the new decoder exited with {extra.returncode}"
            await asyncio.sleep(0.2)
        body = {**chat_body("Keep talking."), "max_tokens": 40, "ignore_eos": True}
        answers = await asyncio.gather(*(post(cluster, body) for _ in range(6)))
        assert [a.status_code for a in answers] == [200] * 6
        assert len({a.json()["choices"][0]["message"]["content"] for a in answers}) == 1  # same on either decoder
        await asyncio.sleep(1.2)  # a heartbeat with the final counts
        workers, _ = await gather_status(cluster.settings.nats_url)
        served = {w.pid: w.served for w in workers if w.role == "decode"}
        assert served[extra.pid] > 0, served  # the newcomer took some of the load
    finally:
        stop([extra])
        cluster.procs.pop("decode-1", None)


@pytest.fixture(scope="module")
def two_encoders(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # a short ack wait: a job whose worker died is redelivered after 3 s instead of 30
    c = start_cluster(
        tiny_model, tmp_path_factory.mktemp("two-encoders"), "e-p-d", counts={"encode": 2}, ack_wait_s=3.0
    )
    yield c
    c.stop()


async def test_an_encoder_killed_mid_run_loses_no_request(two_encoders: Cluster, tiny_model: Path) -> None:
    import os
    import signal

    images = [png_bytes(size=(60 + 8 * i, 60), color=(30 * i, 200 - 20 * i, 90), shape="circle") for i in range(6)]
    expected = [reference(tiny_model, "What color is the shape?", im, 12)[1] for im in images]
    victim = two_encoders.procs["encode-0"].pid
    os.kill(victim, signal.SIGSTOP)  # frozen with its pull request open: JetStream may hand it a job it never acks
    sent = [asyncio.create_task(post(two_encoders, chat_body("What color is the shape?", im))) for im in images]
    await asyncio.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    answers = await asyncio.gather(*sent)
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers if a.status_code != 200]
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == expected
    two_encoders.procs.pop("encode-0").wait(10)
