"""End to end: each topology as `epd up` runs it, driven over HTTP and the NATS-native API."""

import asyncio
import json
from pathlib import Path

import httpx
import nats
import pytest
from epd.core import subjects
from epd.schemas.codec import Decoder, encode
from epd.schemas.common import ImagePart, Message, SamplingParams, TextPart
from epd.schemas.reply import ErrorReply, Reply
from epd.schemas.request import Request

from .conftest import MAX_NEW, chat_body, png_bytes, post
from .oracle import reference

pytestmark = pytest.mark.e2e


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


async def test_requests_sharing_batches_each_get_generates_tokens(cluster, tiny_model: Path) -> None:  # noqa: ANN001
    from .test_families import concurrent_requests_match_generate

    await concurrent_requests_match_generate(cluster, tiny_model, "tiny-qwen2-vl")


async def test_one_image_twice_in_a_request_matches_generate(cluster, tiny_model: Path) -> None:  # noqa: ANN001
    image = png_bytes(size=(84, 66), color=(120, 30, 200), shape="circle")  # new to the cache: encoded here
    _, expected = reference(tiny_model, "Describe the image.", [image, image], MAX_NEW)
    r = await post(cluster, chat_body("Describe the image.", [image, image]))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
