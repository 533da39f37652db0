"""`epd worker encode --engine vllm`: vLLM's vision encoder behind epd's encode stage, and epd's own prefill and
decode workers answering from the embeddings it saved (e-p-d, `epd up --engine vllm`). The oracle: transformers'
greedy `generate` on the same checkpoint and image (tests/oracle.py), as for epd's own encoders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from epd.connectors.ec_shared_dir import SharedDirECConnector
from epd.connectors.keys import KeySpace
from epd.ops.up import Cluster

from tests.conftest import MAX_NEW, chat_body, pictures, png_bytes, post, start_cluster
from tests.oracle import reference

pytestmark = pytest.mark.vllm

QUESTION = "What color is the shape?"


@pytest.fixture(scope="module")
def vllm_encoders(vllm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """e-p-d with `--engine vllm`: the encoder is vLLM's, prefill and decode are epd's. Prefill never encodes
    (`inline_encode` off), so every embedding it uses came from vLLM. A shared-dir cache, to reach the entries."""
    work = tmp_path_factory.mktemp("e-p-d-vllm")
    settings = {"engine": "vllm", "inline_encode": False, "ec_backend": "shared-dir", "ec_dir": str(work / "ec")}
    c = start_cluster(vllm_model, work, "e-p-d", gateway_timeout_s=600, **settings)
    try:
        yield c
    finally:
        c.stop()


async def ask(cluster: Cluster, image: bytes) -> str:
    r = await post(cluster, chat_body(QUESTION, image, model=cluster.settings.model.name))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


async def test_epd_prefill_answers_from_vllms_embeddings(vllm_encoders: Cluster, vllm_model: Path) -> None:
    image = png_bytes((96, 72), (220, 200, 20), "circle")
    _, expected = reference(vllm_model, QUESTION, image, MAX_NEW)
    assert await ask(vllm_encoders, image) == expected
    cache = SharedDirECConnector(vllm_encoders.settings.ec_dir, 1 << 30)
    key = KeySpace.for_checkpoint(vllm_model).key(image)
    assert await cache.exists([key]) == [True]  # saved by vLLM's encoder, under epd's key


async def test_an_image_lost_from_epds_cache_is_saved_again(
    vllm_encoders: Cluster, vllm_model: Path, epd_encoder: object
) -> None:
    """vLLM still holds the image in its own encoder cache, so it does not encode it again; the connector saves
    it from there. Gone (evicted), then damaged in its bytes (prefill sends it back to be encoded `again`): each
    time the answer is the oracle's and the entry is vLLM's embedding, in epd's format."""
    image = png_bytes((80, 64), (20, 200, 220), "circle")
    _, expected = reference(vllm_model, QUESTION, image, MAX_NEW)
    assert await ask(vllm_encoders, image) == expected
    cache = SharedDirECConnector(vllm_encoders.settings.ec_dir, 1 << 30)
    key = KeySpace.for_checkpoint(vllm_model).key(image)
    entry = cache.path(key)
    original = await cache.load(key)
    assert original is not None
    ours = epd_encoder.encode(pictures([image]))[0]  # type: ignore[attr-defined]
    assert original[1] == ours.grid_thw
    torch.testing.assert_close(original[0], ours.embedding, rtol=1e-4, atol=1e-4)

    entry.unlink()
    assert await ask(vllm_encoders, image) == expected
    again = await cache.load(key)
    assert again is not None and torch.equal(again[0], original[0]) and again[1] == original[1]

    damaged = bytearray(entry.read_bytes())
    for i in range(1, 9):  # bytes of the tensor flipped: its checksum fails, prefill has it encoded again
        damaged[-i] ^= 0x5A
    entry.write_bytes(bytes(damaged))
    assert await ask(vllm_encoders, image) == expected
    again = await cache.load(key)
    assert again is not None and torch.equal(again[0], original[0])


async def test_prefill_uses_the_stored_embedding(vllm_encoders: Cluster, vllm_model: Path) -> None:
    """The same image, its entry replaced by seeded noise (a valid entry: the router sends the request straight
    to prefill): the answer changes, so prefill answered from the entry, which vLLM wrote before."""
    image = png_bytes((100, 100), (200, 0, 200))
    _, expected = reference(vllm_model, QUESTION, image, MAX_NEW)
    assert await ask(vllm_encoders, image) == expected
    cache = SharedDirECConnector(vllm_encoders.settings.ec_dir, 1 << 30)
    key = KeySpace.for_checkpoint(vllm_model).key(image)
    embedding, grid = await cache.load(key)
    noise = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0)) * 10 * embedding.abs().max()
    await cache.save(key, noise.to(embedding.dtype), grid)
    assert await ask(vllm_encoders, image) != expected
