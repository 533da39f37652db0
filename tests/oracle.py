"""The correctness oracle: transformers' own `generate`, greedy, on the same inputs.

Built from the checkpoint's tokenizer, chat template and image processor only,
independently of the project's prompt code.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer


@lru_cache(maxsize=2)
def _load(model_dir: str):  # noqa: ANN202
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)


def reference(
    model_dir: Path, question: str, image: bytes | list[bytes] | None, max_new_tokens: int
) -> tuple[list[int], str]:
    """Greedy token ids (EOS included when reached) and their text; `image`: none, one, or several in order."""
    model, tok, proc = _load(str(model_dir))
    images = [image] if isinstance(image, bytes) else image or []
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    kwargs = {}
    if images:
        pix = proc(images=[Image.open(io.BytesIO(im)).convert("RGB") for im in images], return_tensors="pt")
        merge = model.config.vision_config.spatial_merge_size**2
        for grid in pix["image_grid_thw"]:  # each placeholder in turn becomes its image's tokens
            text = text.replace("<|image_pad|>", "<|IMAGE|>" * (int(grid.prod()) // merge), 1)
        text = text.replace("<|IMAGE|>", "<|image_pad|>")
        kwargs = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    if images:
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, **kwargs
        )
    new = out[0, ids.shape[1] :].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


def reference_text(model_dir: Path, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """The same for a raw prompt (completions API): tokenized as is, no chat template."""
    model, tok, _ = _load(str(model_dir))
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    new = out[0, ids.shape[1] :].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


def decode(model_dir: Path, ids: list[int]) -> str:
    return _load(str(model_dir))[1].decode(ids, skip_special_tokens=True)
