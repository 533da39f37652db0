"""Our vision towers (`workers/engine/vision.py`) against transformers' on the CPU in float32.

Tolerance: 1e-4 absolute on embeddings of magnitude ~10 (measured: ~1.3e-5). The arithmetic is transformers' op
for op except the patch embedding (a linear layer in place of the stride = kernel Conv3d: the same products,
summed in another order) and the attention (one SDPA per segment in both, but ours over the whole pack): float32
rounding differences only. Anything structural (a wrong window order, rotary table or segment bound) moves
embeddings by O(1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from epd.workers.engine import load_family
from epd.workers.engine.checkpoint import Checkpoint
from PIL import Image

ATOL = 1e-4
# several sizes, one pack: grids (10, 8), (4, 8), (16, 14), (4, 4), (6, 12) patches; for Qwen2.5-VL's 2 x 2
# merged-token windows these are full windows, ragged edge windows and an image smaller than a window
SIZES = [(150, 100), (64, 120), (300, 260), (56, 56), (90, 170)]


def noise(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def towers(request: pytest.FixtureRequest, tiny_model: Path, tiny_qwen2_5_vl: Path):  # noqa: ANN201
    from transformers import AutoModelForImageTextToText

    path = tiny_model if request.param == "qwen2_vl" else tiny_qwen2_5_vl
    ckpt = Checkpoint.open(path)
    ours = load_family(ckpt, parts="vision")
    theirs = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return ckpt, ours, theirs.model.visual


def test_packed_embeddings_equal_transformers_tower(towers) -> None:  # noqa: ANN001
    ckpt, ours, visual = towers
    images = noise(SIZES)
    batch = ckpt.image_processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        want = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    encoded = ours.encode(images)
    assert [e.grid_thw for e in encoded] == batch["image_grid_thw"].tolist()
    got = torch.cat([e.embedding for e in encoded])
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err < ATOL, f"max abs difference {err:.2e}"
    assert want.abs().max().item() > 1.0  # the comparison is not between near-zero tensors


def test_each_image_alone_equals_its_place_in_a_pack_and_the_grid_cache_changes_nothing(towers) -> None:  # noqa: ANN001
    _, ours, _ = towers
    images = noise(SIZES, seed=1)
    packed = ours.encode(images)
    cached = len(ours.vision._grids)
    assert cached == len({tuple(e.grid_thw) for e in packed})
    again = ours.encode(images[::-1])[::-1]  # every grid now from the cache, in another order in the pack
    assert len(ours.vision._grids) == cached
    for i, image in enumerate(images):
        alone = ours.encode([image])[0].embedding
        assert (alone - packed[i].embedding).abs().max().item() < ATOL
        assert (again[i].embedding - packed[i].embedding).abs().max().item() < ATOL


def test_the_checkpoint_must_hold_every_vision_tensor(tiny_model: Path, tmp_path: Path) -> None:
    from epd.workers.engine.checkpoint import CheckpointError
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "cut"
    folder.mkdir()
    for f in tiny_model.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_model / "model.safetensors")
    dropped = next(k for k in tensors if k.endswith("attn.qkv.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="qkv"):
        load_family(Checkpoint.open(folder), parts="vision")
