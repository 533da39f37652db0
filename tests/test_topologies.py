"""End to end: each topology as `epd up` runs it, driven over HTTP and the NATS-native API."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import nats
import pytest
from epd.ops.trace_view import load_spans, spans_for_request
from epd.schemas import subjects
from epd.schemas.codec import Decoder, encode
from epd.schemas.common import ImagePart, Message, SamplingParams, TextPart
from epd.schemas.reply import ErrorReply, Reply
from epd.schemas.request import Request

from .conftest import data_url, png_bytes, start_cluster
from .oracle import reference

pytestmark = pytest.mark.e2e
MAX_NEW = 12


@pytest.fixture(scope="module", params=["epd", "e-pd", "e-p-d"])
def cluster(request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    c = start_cluster(tiny_model, tmp_path_factory.mktemp(request.param), request.param)
    yield c
    c.stop()
    assert not c.procs  # everything stopped


def chat_body(question: str, image: bytes | None = None, **extra: object) -> dict:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image else []
    content.append({"type": "text", "text": question})
    return {
        "model": "tiny-qwen2-vl",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_NEW,
        "temperature": 0,
        **extra,
    }


async def post(cluster, body: dict) -> httpx.Response:  # noqa: ANN001
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=120) as client:
        return await client.post("/v1/chat/completions", json=body)


async def test_image_chat_matches_generate(cluster, tiny_model: Path) -> None:  # noqa: ANN001
    image = png_bytes(size=(120, 90), color=(200, 30, 30), shape="circle")
    _, expected = reference(tiny_model, "What color is the shape?", image, MAX_NEW)
    r = await post(cluster, chat_body("What color is the shape?", image))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == expected
    assert out["id"].startswith("chatcmpl-") and out["usage"]["completion_tokens"] >= 1
    # the same image again: served from the encoder cache, same answer
    again = await post(cluster, chat_body("What color is the shape?", image))
    assert again.json()["choices"][0]["message"]["content"] == expected
    if cluster.settings.topology == "e-p-d":
        await assert_trace_spans_every_process(cluster, out["id"])


async def assert_trace_spans_every_process(cluster, request_id: str) -> None:  # noqa: ANN001
    trace_dir = Path(cluster.settings.trace_dir)
    wanted = {"epd-gateway", "epd-encode", "epd-prefill", "epd-decode"}
    services: set[str] = set()
    roots: list[dict] = []
    # Each process flushes its spans every 200 ms, and a parent span is written only when it ends,
    # after its children: wait until the whole tree is on disk, not just a span from each process.
    for _ in range(50):
        spans = spans_for_request(load_spans(trace_dir), request_id)
        services = {s["service"] for s in spans}
        ids = {s["span_id"] for s in spans}
        roots = [s for s in spans if s["parent_id"] not in ids]
        if wanted <= services and len(roots) == 1:
            break
        await asyncio.sleep(0.2)
    assert wanted <= services
    assert len({s["trace_id"] for s in spans}) == 1
    assert len(roots) == 1, roots  # every other span hangs off the gateway's request span
    out = subprocess.run(
        [sys.executable, "-m", "epd.ops.cli", "trace", request_id, "--dir", str(trace_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for name in ("route", "encode", "prefill.forward", "kv.send", "kv.recv", "decode"):
        assert any(line.strip().startswith(name) for line in out.stdout.splitlines()), out.stdout
    assert "epd-decode[" in out.stdout and "epd-encode[" in out.stdout


async def test_nats_native_api_tokens_match_generate(cluster, tiny_model: Path) -> None:  # noqa: ANN001
    image = png_bytes(size=(64, 200), color=(20, 20, 220))
    expected_ids, _ = reference(tiny_model, "What shape is it?", image, MAX_NEW)
    nc = await nats.connect(cluster.settings.nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = Request(
            model="tiny-qwen2-vl",
            sampling=SamplingParams(max_tokens=MAX_NEW),
            messages=[Message(role="user", content=[ImagePart(data=image), TextPart(text="What shape is it?")])],
        )
        await nc.publish(subjects.REQUEST, encode(req), reply=inbox)
        chunks, decoder = [], Decoder(Reply)
        while not chunks or chunks[-1].finish_reason is None:
            reply = decoder.decode((await sub.next_msg(timeout=120)).data)
            assert not isinstance(reply, ErrorReply), reply
            chunks.append(reply)
    finally:
        await nc.close()
    chunks.sort(key=lambda c: c.seq)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c.token_ids] == expected_ids
    assert chunks[-1].usage.completion_tokens == len(expected_ids)


async def test_text_only_and_concurrent_requests(cluster, tiny_model: Path) -> None:  # noqa: ANN001
    questions = ["Hello, how are you today?", "Describe the image."]
    expected = [reference(tiny_model, q, None, MAX_NEW)[1] for q in questions]
    image = png_bytes(size=(80, 80), color=(250, 220, 0))
    results = await asyncio.gather(
        *(post(cluster, chat_body(q)) for q in questions), post(cluster, chat_body("What color is the shape?", image))
    )
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert [r.json()["choices"][0]["message"]["content"] for r in results[:2]] == expected


async def test_streaming_sse(cluster, tiny_model: Path) -> None:  # noqa: ANN001
    _, expected = reference(tiny_model, "What shape is it?", None, MAX_NEW)
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=120) as client:
        async with client.stream("POST", "/v1/chat/completions", json=chat_body("What shape is it?", stream=True)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_bad_requests_get_clear_errors(cluster) -> None:  # noqa: ANN001
    r = await post(cluster, {**chat_body("hi"), "model": "no-such-model"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and "no-such-model" in r.json()["error"]["message"]
    r = await post(cluster, chat_body("hi", image=b"this is not a png"))
    assert r.status_code == 400 and "image 0" in r.json()["error"]["message"]
    r = await post(cluster, {"model": "tiny-qwen2-vl", "messages": "nope"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    ok = await post(cluster, chat_body("Hello, how are you today?"))  # still serving
    assert ok.status_code == 200
    async with httpx.AsyncClient(base_url=cluster.base_url) as client:
        models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["tiny-qwen2-vl"]
