"""`--engine vllm`: vLLM's AsyncLLM inside epd's pd and epd workers, behind epd's gateway (and, in e-pd, encode
workers on vLLM too: vLLM's encoder saves, vLLM's pd loads, through EpdECConnector on Mooncake Store). The
oracle: vLLM's own offline greedy answer on the same checkpoint, chat template and image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from epd.connectors.ec_mooncake import MooncakeECConnector
from epd.connectors.keys import KeySpace
from epd.connectors.mooncake_store import MooncakeStore
from epd.ops.up import Cluster
from transformers import AutoTokenizer

from tests.conftest import chat_body, pictures, png_bytes, post, start_cluster

pytestmark = pytest.mark.vllm

QUESTION = "What shape is it?"


@pytest.fixture(scope="module", params=["e-pd", "epd"])
def vllm_cluster(
    request: pytest.FixtureRequest, vllm_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        workdir = tmp_path_factory.mktemp(f"{request.param}-vllm")
        c = start_cluster(vllm_model, workdir, request.param, engine="vllm", max_batch=2, max_seqs=2)
        try:
            yield c
        finally:
            c.stop()


def offline_answer(llm: Any, model: Path, image: bytes, max_tokens: int) -> str:
    from vllm import SamplingParams

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = AutoTokenizer.from_pretrained(model).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    inputs = {"prompt": prompt, "multi_modal_data": {"image": pictures([image])[0]}}
    out = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return out[0].outputs[0].text


async def ask(cluster: Cluster, model: Path, image: bytes) -> tuple[str, int]:
    r = await post(cluster, chat_body(QUESTION, image, model=model.name))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"]


async def test_answers_as_vllm_does(vllm_cluster: Cluster, llm: Any, vllm_model: Path) -> None:
    image = png_bytes((90, 120), (0, 160, 255), "circle")
    text, n = await ask(vllm_cluster, vllm_model, image)
    assert text == offline_answer(llm, vllm_model, image, n)


@pytest.mark.parametrize("vllm_cluster", ["e-pd"], indirect=True)  # epd keeps no shared cache
async def test_e_pd_answers_from_the_shared_cache(
    vllm_cluster: Cluster, llm: Any, vllm_model: Path, epd_encoder: Any
) -> None:
    """An image whose entry is already in epd's cache goes straight to the pd worker, whose vLLM loads that
    entry: damaged (seeded noise), it changes vLLM's answer, so vLLM did not encode the image itself."""
    image = png_bytes((100, 100), (200, 0, 200))
    encoded = epd_encoder.encode(pictures([image]))[0]
    noise = torch.randn(encoded.embedding.shape, generator=torch.Generator().manual_seed(0))
    store = MooncakeStore(vllm_cluster.settings, segment_mb=0)
    try:
        key = KeySpace.for_checkpoint(vllm_model).key(image)
        await MooncakeECConnector(store).save(key, noise * 10 * encoded.embedding.abs().max(), encoded.grid_thw)
        text, n = await ask(vllm_cluster, vllm_model, image)
        assert text != offline_answer(llm, vllm_model, image, n)
    finally:
        store.close()
