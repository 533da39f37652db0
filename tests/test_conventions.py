"""Our language model against the installed transformers' own uncached forward, on the same checkpoint.

The engine runs its own decoder (`workers/engine/qwen2_text.py`) with the checkpoint's tensors and the config's
names (`rope_parameters`, `mrope_section`, `rms_norm_eps`, ...); transformers stays the oracle. If a release
renames a tensor or a config field, or changes the layers' arithmetic, these fail here, before any request does.
"""

from pathlib import Path

import pytest
import torch
from epd.workers.engine import load_family
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.kv_cache import PagedKVCache

from .conftest import engine_prompt, png_bytes
from .oracle import _load

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def engine(tiny_model: Path):  # noqa: ANN201
    ckpt = Checkpoint.open(tiny_model)
    return ckpt, load_family(ckpt), _load(str(tiny_model))[0]


@pytest.mark.parametrize("images", [0, 1], ids=["text", "image"])
def test_prefill_and_a_decode_step_on_the_paged_cache_equal_the_uncached_forward(engine, images: int) -> None:  # noqa: ANN001
    ckpt, family, model = engine
    pictures = [png_bytes(size=(90, 70), shape="circle")] * images
    ids, encoded = engine_prompt(ckpt, family, "Hello, how are you today?", pictures)
    out = family.prefill(ids, encoded)
    assert out.kv.shape == (family.text.config.num_hidden_layers, 2, 2, len(ids), family.text.head_dim)
    token = int(torch.argmax(out.logits))
    cache = PagedKVCache(family.kv_layout(), 1 << 20)
    blocks = cache.reserve(len(ids) + 1)
    cache.write(blocks, out.kv)
    step = family.decode_step([token], [len(ids) + out.rope_delta], cache, cache.step_inputs([blocks], [len(ids)]))

    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids + [token]]), **_image_inputs(ckpt, pictures, ids + [token], model))
    full = full.logits[0].float()
    torch.testing.assert_close(out.logits, full[len(ids) - 1], rtol=1e-4, atol=1e-4)
    # a cache the step ignored would give the logits of the lone token instead
    torch.testing.assert_close(step[0], full[-1], rtol=1e-4, atol=1e-4)


def _image_inputs(ckpt: Checkpoint, pictures: list[bytes], ids: list[int], model) -> dict:  # noqa: ANN001
    """The pixels, as transformers' forward takes them: it runs its own vision tower and M-RoPE positions."""
    if not pictures:
        return {}
    from .conftest import pictures as open_pictures

    pix = ckpt.image_processor(images=open_pictures(pictures), return_tensors="pt")
    mm = (torch.tensor([ids]) == model.config.image_token_id).int()
    return {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"], "mm_token_type_ids": mm}
