"""Image bytes enter the system once, at the gateway: every message between stages carries keys only."""

import io
import random
from pathlib import Path

import nats
import pytest
from epd.core import subjects
from epd.ops.up import Cluster
from PIL import Image

from .conftest import MAX_NEW, chat_body, post
from .oracle import reference

pytestmark = pytest.mark.e2e


def noise_png(side: int, seed: int) -> bytes:
    """A picture PNG cannot shrink: random pixels, about 3 bytes a pixel."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (side, side), rng.randbytes(3 * side * side))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@pytest.mark.parametrize("cluster", ["epd", "e-p-d"], indirect=True)
async def test_a_request_at_the_limits_is_served_and_no_stage_message_carries_images(
    cluster: Cluster, tiny_model: Path
) -> None:
    images = [noise_png(944, seed) for seed in range(8)]  # 8 images (the limit), a ~30 MB body (limit 32)
    body = chat_body("Describe the image.", images)
    assert 28e6 < len(str(body)) < 32 * 2**20

    sizes: list[int] = []
    nc = await nats.connect(cluster.settings.nats_url)
    try:
        # every stage's jobs and events (the client's own NATS API request is the only message with images)
        async def seen(msg: nats.aio.msg.Msg) -> None:
            sizes.append(len(msg.data))

        sub = await nc.subscribe(f"{subjects.PREFIX}.>", cb=seen)
        r = await post(cluster, body)
        await nc.flush()
        await sub.unsubscribe()
    finally:
        await nc.close()
    assert r.status_code == 200, r.text
    expected, _ = reference(tiny_model, "Describe the image.", images, MAX_NEW)
    assert r.json()["usage"]["completion_tokens"] == len(expected)
    assert sizes, "no stage message was seen"
    assert max(sizes) < 64 * 1024, f"a stage message of {max(sizes)} bytes: image bytes ride the bus"
