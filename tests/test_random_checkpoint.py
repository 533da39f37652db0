"""The GPU benchmarks' checkpoint (tools/random_checkpoint.py) at its small size: Qwen's ids and vocabulary, the
published weight names, and a model the engine serves as transformers runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from epd.tools.random_checkpoint import SPECIAL_IDS, VOCAB, build
from transformers import AutoTokenizer

from .conftest import chat_body, png_bytes, post, start_cluster
from .oracle import reference

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def random_7b_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("ckpt") / "qwen2.5-vl-7b-small", small=True, std=0.2, shard_gb=0.05)


def test_the_tokenizer_has_qwens_ids_and_every_id_decodes_to_a_word(random_7b_small: Path) -> None:
    tok = AutoTokenizer.from_pretrained(random_7b_small)
    assert len(tok) == VOCAB
    assert {name: tok.convert_tokens_to_ids(name) for name in SPECIAL_IDS} == SPECIAL_IDS
    assert tok("t5 t17 t151642", add_special_tokens=False).input_ids == [5, 17, 151642]
    assert tok.decode([42, 151000, 7]) == "t42 t151000 t7"  # a stream of random ids is visible text


def test_the_weights_carry_the_published_names_in_several_shards(random_7b_small: Path) -> None:
    index = json.loads((random_7b_small / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    assert "lm_head.weight" in index and "model.embed_tokens.weight" in index
    assert any(k.startswith("visual.blocks.") for k in index) and any(k.startswith("model.layers.") for k in index)
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in index)
    # the class engines build from it, as the published config names it (vLLM took it for an embedding model)
    config = json.loads((random_7b_small / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


async def test_epd_serves_it_as_transformers_generates(random_7b_small: Path, tmp_path: Path) -> None:
    cluster = start_cluster(random_7b_small, tmp_path, "epd")
    try:
        image = png_bytes(size=(120, 90), color=(30, 160, 60), shape="circle")
        for question, images in (("t10 t20 t30 describe", [image]), ("t1 t2 t3", [])):
            _, expected = reference(random_7b_small, question, images or None, 8)
            body = chat_body(question, images, model=random_7b_small.name, max_tokens=8)
            r = await post(cluster, body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected != ""
    finally:
        cluster.stop()
