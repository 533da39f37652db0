"""Qwen2.5-VL end to end: every topology gives transformers' `generate` tokens, batches included.

Qwen2-VL runs the same checks in test_topologies.py (the session's `cluster`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from epd.ops.up import Cluster

from .conftest import chat_body, png_bytes, post, start_cluster
from .oracle import reference

pytestmark = pytest.mark.e2e
MODEL = "tiny-qwen2.5-vl"  # the checkpoint's folder name: the served model name


@pytest.fixture(scope="module", params=["epd", "e-pd", "e-p-d"])
def qwen25(
    request: pytest.FixtureRequest, tiny_qwen2_5_vl: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    c = start_cluster(tiny_qwen2_5_vl, tmp_path_factory.mktemp(f"q25-{request.param}"), request.param)
    yield c
    c.stop()


async def answer(cluster: Cluster, body: dict) -> str:
    r = await post(cluster, body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


async def test_qwen25_image_text_and_two_image_requests_match_generate(qwen25: Cluster, tiny_qwen2_5_vl: Path) -> None:
    circle = png_bytes(size=(150, 100), color=(220, 30, 30), shape="circle")  # several vision windows
    square = png_bytes(size=(64, 120), color=(30, 30, 220))
    cases = [
        ("What color is the shape?", [circle]),
        ("Hello, how are you today?", []),
        ("Describe the image.", [circle, square]),
    ]
    for question, images in cases:
        _, expected = reference(tiny_qwen2_5_vl, question, images or None, 12)
        assert await answer(qwen25, chat_body(question, images, model=MODEL, max_tokens=12)) == expected, question


async def test_qwen25_requests_sharing_batches_each_get_generates_tokens(
    qwen25: Cluster, tiny_qwen2_5_vl: Path
) -> None:
    await concurrent_requests_match_generate(qwen25, tiny_qwen2_5_vl, MODEL)


async def concurrent_requests_match_generate(cluster: Cluster, model_dir: Path, model: str) -> None:
    """Eight requests of different prompts, images and lengths, arriving while others decode.

    They share encode, prefill and decode batches (joining a running decode batch
    mid-flight); the batch must not change anyone's tokens."""
    pictures = [png_bytes(size=(56 + 24 * i, 70 + 10 * i), color=(40 * i, 200 - 20 * i, 90)) for i in range(4)]
    questions = ["What shape is it?", "Tell me a story.", "What color is the shape?", "Describe the image."]
    cases = [(questions[i % 4], [pictures[i % 4]] if i % 2 == 0 else [], 6 + 3 * i) for i in range(8)]
    expected = [reference(model_dir, q, ims or None, n)[1] for q, ims, n in cases]

    async def one(i: int) -> str:
        await asyncio.sleep(0.03 * i)  # staggered: later ones join batches already running
        return await answer(cluster, chat_body(*cases[i][:2], model=model, max_tokens=cases[i][2]))

    assert await asyncio.gather(*(one(i) for i in range(len(cases)))) == expected
