"""`epd up --encoders 2 --prefills 2 --decoders 2`: every pool of two takes work.

A request's images are encoded in parallel on both encoders; prefill spreads its requests over
both decoders by free KV; text-only requests have their own prefill queue, so image requests
holding every prefill slot do not hold them up.
"""

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from epd.connectors.keys import KeySpace
from epd.core import subjects
from epd.ops.status_view import gather_status
from epd.ops.trace_view import load_spans, spans_for_request

from .conftest import chat_body, epd_up, png_bytes
from .oracle import reference

pytestmark = pytest.mark.e2e

COUNTS = {"encode": 2, "prefill": 2, "decode": 2}


class Up:
    def __init__(self, base_url: str, workdir: Path, tiny_model: Path) -> None:
        self.base_url, self.workdir, self.model = base_url, workdir, tiny_model
        endpoints = json.loads((workdir / "endpoints.json").read_text())
        self.nats_url, self.trace_dir = endpoints["nats_url"], Path(endpoints["trace_dir"])

    async def post(self, body: dict) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=120) as client:
            return await client.post("/v1/chat/completions", json=body)

    async def spans(self, request_id: str, name: str, count: int) -> list[dict]:
        """The request's spans called `name`, once `count` of them are on disk (bounded wait)."""
        found: list[dict] = []
        for _ in range(50):
            found = [s for s in spans_for_request(load_spans(self.trace_dir), request_id) if s["name"] == name]
            if len(found) >= count:
                break
            await asyncio.sleep(0.2)
        return found


@pytest.fixture(scope="module")
def up(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    workdir = tmp_path_factory.mktemp("scaled")
    flags = ("--encoders", "2", "--prefills", "2", "--decoders", "2")
    # one image slot per prefill worker (EPD_MAX_BATCH=1), so that two held image requests hold them all
    with epd_up(tiny_model, workdir, "e-p-d", *flags, EPD_ENCODE_WAIT_S="8", EPD_MAX_BATCH="1") as base_url:
        yield Up(base_url, workdir, tiny_model)


async def test_every_worker_of_every_pool_is_live(up: Up) -> None:
    workers, queues = await gather_status(up.nats_url)
    assert {role: sum(w.role == role for w in workers) for role in COUNTS} == COUNTS
    assert {"encode", "prefill", "prefill-text", "decode"} <= set(queues)
    decoders = [w for w in workers if w.role == "decode"]
    # what prefill chooses by: the cache the budget buys (tiny model: 2 layers x K,V x 2 heads x 16 dims x 4 bytes)
    assert all(w.kv_capacity == 512 * 2**20 // (2 * 2 * 2 * 16 * 4) for w in decoders)


async def test_one_requests_images_are_encoded_in_parallel(up: Up) -> None:
    images = [png_bytes(size=(70 + 20 * i, 84), color=(200, 40 * i, 30), shape="circle") for i in range(2)]
    r = await up.post(chat_body("What color is the shape?", images))
    assert r.status_code == 200, r.text
    expected = reference(up.model, "What color is the shape?", images, 12)[1]
    assert r.json()["choices"][0]["message"]["content"] == expected
    encodes = await up.spans(r.json()["id"], "encode", 2)
    assert len(encodes) == 2 and all(s["attributes"]["epd.images"] == 1 for s in encodes)
    assert len({s["pid"] for s in encodes}) == 2  # one image on each encoder
    route = (await up.spans(r.json()["id"], "route", 1))[0]["attributes"]
    assert route["epd.encode_parts"] == 2


async def test_prefill_spreads_requests_over_both_decoders(up: Up) -> None:
    before = {w.worker_id: w.served for w in (await gather_status(up.nats_url))[0] if w.role == "decode"}
    body = {**chat_body("Keep talking."), "max_tokens": 30, "ignore_eos": True}
    answers = await asyncio.gather(*(up.post(body) for _ in range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    assert len({a.json()["choices"][0]["message"]["content"] for a in answers}) == 1  # same on either decoder
    assert all(a.json()["usage"]["completion_tokens"] == 30 for a in answers)
    decodes = [s for a in answers for s in await up.spans(a.json()["id"], "decode", 1)]
    pids = [s["pid"] for s in decodes]
    assert len(set(pids)) == 2 and min(pids.count(p) for p in set(pids)) >= 2, pids  # spread, not piled
    await asyncio.sleep(1.2)  # a heartbeat with the final counts
    after = {w.worker_id: w.served for w in (await gather_status(up.nats_url))[0] if w.role == "decode"}
    assert all(after[w] > before[w] for w in before)


@pytest.mark.parametrize("topology, counts", [("e-pd", {"encode": 2, "pd": 2}), ("epd", {"epd": 2})])
async def test_epd_up_scales_the_other_topologies(
    topology: str, counts: dict[str, int], tiny_model: Path, tmp_path: Path
) -> None:
    with epd_up(tiny_model, tmp_path, topology, "--encoders", "2", "--prefills", "2") as base_url:
        nats_url = json.loads((tmp_path / "endpoints.json").read_text())["nats_url"]
        workers, _ = await gather_status(nats_url)
        assert {role: sum(w.role == role for w in workers) for role in counts} == counts
        body = {**chat_body("Keep talking."), "max_tokens": 20, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        await asyncio.sleep(1.2)  # a heartbeat with the final counts
        workers, _ = await gather_status(nats_url)
        served = [w.served for w in workers if w.role in ("pd", "epd")]
        assert len(served) == 2 and min(served) > 0, served  # both took requests


async def test_text_is_served_while_image_requests_hold_every_prefill_slot(up: Up) -> None:
    """Two image requests wait in prefill for an embedding that another request claims to be encoding
    (EPD_ENCODE_WAIT_S=8), one on each prefill worker; a text request must not queue behind them."""
    keys = KeySpace.for_checkpoint(up.model)
    images = [png_bytes(size=(50 + 6 * i, 50), color=(10, 10, 200 - 30 * i), shape="square") for i in range(2)]
    nc = await nats.connect(up.nats_url)
    try:
        claims = await nc.jetstream().key_value(subjects.ENCODING_BUCKET)
        for im in images:  # "being encoded elsewhere": the router marks them pending, prefill waits
            await claims.create(keys.key(im), b"")
    finally:
        await nc.close()
    finished: dict[str, float] = {}

    async def timed(name: str, body: dict) -> httpx.Response:
        r = await up.post(body)
        finished[name] = time.monotonic()
        return r

    held = [asyncio.create_task(timed(f"image{i}", chat_body("Color?", im))) for i, im in enumerate(images)]
    for _ in range(50):  # both image requests are in prefill, each holding its worker's one image slot
        _, queues = await gather_status(up.nats_url)
        if queues["prefill"]["working"] == 2:
            break
        await asyncio.sleep(0.1)
    assert queues["prefill"]["working"] == 2, queues
    text = await timed("text", chat_body("Just text."))
    assert text.status_code == 200
    assert text.json()["choices"][0]["message"]["content"] == reference(up.model, "Just text.", None, 12)[1]
    assert not any(t.done() for t in held)  # answered while both image requests were still held
    answers = await asyncio.gather(*held)  # after the wait, prefill has them encoded: nothing is lost
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert finished["text"] < min(finished["image0"], finished["image1"])
