"""How far the torch image preprocessing (`workers/engine/image_preprocess.py`) sits from transformers' image
processor, on the CPU: pixel_values, the demo model's vision embeddings, and the demo model's answers.

    python bench/image_preprocess_cpu.py [--pictures 100] [--out bench/results/image_preprocess_cpu.json]

Three image sets: the demo model's pictures (`tools/shapes.py`, 48..512 px, through the demo processor whose
max is 140x140 px: mostly downscaled), smooth "photo-like" images (blurred noise) and raw noise (the worst
case for resampling), each at sizes that upscale, downscale one or both sides, and keep one side, through
the demo processor and Qwen2.5-VL's default (max 28*28*1280 px). Answers: the demo model's greedy answers
(transformers' `generate`, as the oracle asks it) to the color and shape questions, with the processor's
pixels and with ours (asked only where the pixels differ: the same pixels give the same answers).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

OUT = Path(__file__).resolve().parent / "results" / "image_preprocess_cpu.json"
SIZES = [(448, 448), (1024, 1024), (300, 200), (37, 900), (1000, 30), (57, 58), (2000, 1500), (224, 225), (640, 480),
         (480, 640), (123, 457), (810, 97)]  # fmt: skip


def image_sets(pictures: int) -> dict[str, list[np.ndarray]]:
    from epd.tools import shapes

    rng = np.random.default_rng(0)
    demo_rng = random.Random(2026)
    noise = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    smooth = [np.asarray(Image.fromarray(n).filter(ImageFilter.GaussianBlur(4))) for n in noise]
    demo = [np.asarray(shapes.draw(demo_rng).image.convert("RGB")) for _ in range(pictures)]
    return {"demo pictures": demo, "smooth": smooth, "noise": noise}


def pixel_diffs(processor: Any, images: list[np.ndarray]) -> dict[str, float]:
    from epd.workers.engine.image_preprocess import TorchImageProcessor

    ours = TorchImageProcessor.for_processor(processor, "cpu", torch.float32)
    worst, total, count, differing, images_differing = 0.0, 0.0, 0, 0, 0
    for im in images:
        want = processor(images=[Image.fromarray(im)], return_tensors="pt")
        got, grids = ours([im])
        assert grids == want["image_grid_thw"].tolist()
        d = (got - want["pixel_values"]).abs()
        worst = max(worst, d.max().item())
        total += d.sum().item()
        count += d.numel()
        differing += int((d > 0).sum())
        images_differing += bool((d > 0).any())
    return {
        "images": len(images),
        "max_abs": worst,
        "mean_abs": total / count,
        "share_of_values_differing": differing / count,
        "images_differing": images_differing,
    }


def answers_and_embeddings(model_dir: Path, images: list[np.ndarray]) -> dict[str, Any]:
    from epd.workers.engine.image_preprocess import TorchImageProcessor
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok, proc = AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)
    ours = TorchImageProcessor.for_processor(proc, "cpu", torch.float32)
    merge = model.config.vision_config.spatial_merge_size**2
    emb_max, emb_scale, changed, asked = 0.0, 0.0, [], 0
    for i, im in enumerate(images):
        want = proc(images=[Image.fromarray(im)], return_tensors="pt")
        pixels, grids = ours([im])
        grid = torch.tensor(grids)
        with torch.inference_mode():
            a = model.model.visual(want["pixel_values"], grid_thw=grid).pooler_output
            b = model.model.visual(pixels, grid_thw=grid).pooler_output
        emb_max = max(emb_max, (a - b).abs().max().item())
        emb_scale = max(emb_scale, a.abs().max().item())
        if torch.equal(want["pixel_values"], pixels):  # the same pixels: the same answers, by construction
            asked += 2
            continue
        for question in ("What color is the shape?", "What shape is it?"):
            content = [{"type": "image"}, {"type": "text", "text": question}]
            text = tok.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(grid[0].prod()) // merge), 1)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            outs = []
            for px in (want["pixel_values"], pixels):
                with torch.inference_mode():
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        pixel_values=px,
                        image_grid_thw=grid,
                        mm_token_type_ids=(ids == model.config.image_token_id).int(),
                        max_new_tokens=8,
                        do_sample=False,
                    )
                outs.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
            asked += 1
            if outs[0] != outs[1]:
                changed.append({"picture": i, "question": question, "processor": outs[0], "torch": outs[1]})
    return {
        "embedding_max_abs_diff": emb_max,
        "embedding_max_abs": emb_scale,
        "answers_asked": asked,
        "answers_changed": len(changed),
        "changed": changed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pictures", type=int, default=100)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    import PIL
    from epd.tools.demo_model import SHIPPED
    from transformers import AutoImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    sets = image_sets(args.pictures)
    processors = {"demo": AutoImageProcessor.from_pretrained(SHIPPED), "qwen2.5-vl default": Qwen2VLImageProcessorPil()}
    results: dict[str, Any] = {"pillow": PIL.__version__, "torch": torch.__version__, "pixels": []}
    for pname, proc in processors.items():
        for sname, images in sets.items():
            row = {"processor": pname, "images": sname, **pixel_diffs(proc, images)}
            results["pixels"].append(row)
            print(row, flush=True)
    results["demo_model"] = answers_and_embeddings(SHIPPED, sets["demo pictures"])
    print({k: v for k, v in results["demo_model"].items() if k != "changed"}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
