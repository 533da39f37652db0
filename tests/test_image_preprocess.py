"""The torch image preprocessing (`workers/engine/image_preprocess.py`) against transformers' image processor.

Tolerance, and why (the module's doc has the figures). Where Pillow resamples the width first (every upscale,
every image already at its target size, and the downscales Pillow 13 does not turn around) the pixel values
are equal bit for bit. Pillow 13 resamples the height first in some downscales, by an undocumented criterion;
there the two 8-bit roundings happen in the other order and a few values move by several levels (measured
over 200 demo pictures: max abs 0.18 in normalised units, 0.07% of values; raw noise up to 0.34). That is the
difference between Pillow 12 and 13 on the same image, so we accept it: max abs 0.5, at most 1% of values
differing, mean abs 1e-3, embeddings within 2% of their largest magnitude, and the demo model's answers to
its questions unchanged."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from epd.tools import shapes
from epd.tools.demo_model import SHIPPED
from epd.workers.engine import load_family
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.family import ImageRejected
from epd.workers.engine.image_preprocess import TorchImageProcessor, smart_resize
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as their_smart_resize

PIXEL_ATOL, PIXEL_SHARE, PIXEL_MEAN = 0.5, 0.01, 1e-3
EMBEDDING_RTOL = 0.02  # of the embeddings' largest magnitude
SIZES = [(448, 448), (1024, 1024), (300, 200), (57, 58), (224, 225), (1000, 30), (2000, 1500), (640, 480),
         (480, 640), (123, 457), (20, 3000), (30, 40), (56, 84), (10, 60), (97, 1300), (40, 30), (50, 70),
         (14, 200)]  # fmt: skip
PROCESSORS = {
    "demo": dict(min_pixels=3136, max_pixels=19600),
    "qwen2.5-vl": dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
    "tiny": dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64),
}


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", PROCESSORS)
def test_grids_are_the_processors(name: str) -> None:
    cfg = PROCESSORS[name]
    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(1, 5000), rng.randint(1, 5000)
        try:
            want = their_smart_resize(h, w, 28, cfg["min_pixels"], cfg["max_pixels"])
        except ValueError:
            with pytest.raises(ValueError):
                smart_resize(h, w, 28, cfg["min_pixels"], cfg["max_pixels"])
            continue
        assert smart_resize(h, w, 28, cfg["min_pixels"], cfg["max_pixels"]) == want, (h, w)


@pytest.mark.parametrize("name", PROCESSORS)
def test_pixels_equal_the_processors_bit_for_bit_where_the_height_is_not_scaled_down(name: str) -> None:
    """Pillow resamples the width first there (13 turns the order around only for some height reductions)."""
    proc = Qwen2VLImageProcessorPil(**PROCESSORS[name])
    ours = TorchImageProcessor.for_processor(proc, "cpu", torch.float32)
    sizes = [(h, w) for h, w in SIZES if ours.grid(h, w)[1] * 14 >= h]
    assert len(sizes) >= 5
    for i, (h, w) in enumerate(sizes):
        want = proc(images=[Image.fromarray(noise(h, w, i))], return_tensors="pt")
        got, grids = ours([noise(h, w, i)])
        assert grids == want["image_grid_thw"].tolist()
        assert torch.equal(got, want["pixel_values"]), (h, w, (got - want["pixel_values"]).abs().max().item())


def test_pixels_sit_within_the_stated_tolerance_everywhere() -> None:
    """Demo pictures (mostly downscaled both ways, many height-first) and noise of height-first shapes."""
    rng = random.Random(7)
    proc = Qwen2VLImageProcessorPil(**PROCESSORS["demo"])
    ours = TorchImageProcessor.for_processor(proc, "cpu", torch.float32)
    images = [np.asarray(shapes.draw(rng).image.convert("RGB")) for _ in range(40)]
    images += [noise(h, w, h) for h, w in [(500, 120), (37, 900), (400, 300), (911, 640)]]
    worst, total, count, differing = 0.0, 0.0, 0, 0
    for im in images:
        want = proc(images=[Image.fromarray(im)], return_tensors="pt")["pixel_values"]
        got, _ = ours([im])
        d = (got - want).abs()
        worst, total, count, differing = (
            max(worst, d.max().item()),
            total + d.sum().item(),
            count + d.numel(),
            differing + int((d > 0).sum()),
        )
    assert worst <= PIXEL_ATOL
    assert differing / count <= PIXEL_SHARE
    assert total / count <= PIXEL_MEAN
    assert differing > 0  # the height-first noise is in the set: this test is where the tolerance is exercised


def test_the_demo_models_embeddings_and_answers_do_not_change() -> None:
    from transformers import AutoModelForImageTextToText

    ckpt = Checkpoint.open(SHIPPED)
    processor_path, torch_path = (
        load_family(ckpt, parts="vision"),
        load_family(ckpt, parts="vision", preprocess="torch"),
    )
    assert processor_path.preprocessor is None and torch_path.preprocessor is not None  # the CPU's default: processor
    rng = random.Random(11)
    pictures = [shapes.draw(rng).image.convert("RGB") for _ in range(24)]
    a, b = processor_path.encode(pictures), torch_path.encode(pictures)
    scale = max(e.embedding.abs().max().item() for e in a)
    worst = max((x.embedding - y.embedding).abs().max().item() for x, y in zip(a, b, strict=True))
    assert worst <= EMBEDDING_RTOL * scale, (worst, scale)
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    changed = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if not torch.equal(x.embedding, y.embedding)]
    assert changed, "no picture's pixels differ: the answers below compare nothing"
    for i in changed:
        for question in ("What color is the shape?", "What shape is it?"):
            want = _answer(ckpt, model, question, *processor_path.prepare([pictures[i]]))
            assert _answer(ckpt, model, question, *torch_path.prepare([pictures[i]])) == want, (i, question)


def _answer(ckpt: Checkpoint, model, question: str, pixels: torch.Tensor, grids: list[list[int]]) -> str:  # noqa: ANN001
    """The demo model's greedy answer from these pixel values (transformers' generate, as the oracle asks)."""
    tok = ckpt.tokenizer
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(np.prod(grids[0])) // 4), 1)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            image_grid_thw=torch.tensor(grids),
            mm_token_type_ids=(ids == model.config.image_token_id).int(),
            max_new_tokens=8,
            do_sample=False,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_an_image_the_processor_refuses_is_refused_by_both_paths(tiny_model: Path) -> None:
    family = load_family(Checkpoint.open(tiny_model), parts="vision", preprocess="torch")
    with pytest.raises(ImageRejected):
        family.encode([Image.fromarray(noise(10, 2100))])  # aspect ratio over 200
