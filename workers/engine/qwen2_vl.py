"""Qwen2-VL: our vision tower (`vision.py`) over the image processor's patches, and M-RoPE positions for a
prompt through transformers' position code."""

from __future__ import annotations

from typing import Any

import torch
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.family import Encoded, Family, ImageRejected
from epd.workers.engine.vision import tower_from_module
from epd.workers.engine.weights import Parts, load_model, text_from_model
from PIL import Image


class Qwen2VL(Family):
    def __init__(
        self, ckpt: Checkpoint, device: str = "cpu", dtype: str = "float32", parts: Parts = "all", model: Any = None
    ) -> None:
        """`model`: a transformers model already built (benchmarks build random weights on the device instead of
        loading); the language model and vision tower are then ours with its weights, and `model` keeps its own
        (the baseline)."""
        self.ckpt = ckpt
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        if model is None:
            self.model, self.text, self.vision = load_model(ckpt, self.device, self.dtype, parts)
        else:
            self.model, self.text = model, text_from_model(model, self.device, self.dtype)
            self.vision = tower_from_module(model.model.visual, model.config, self.device, self.dtype)
        self.config = self.model.config
        self.image_token_id = int(self.config.image_token_id)
        self.merge = int(self.config.vision_config.spatial_merge_size)

    def image_tokens(self, grid_thw: list[int]) -> int:
        t, h, w = grid_thw
        return t * h * w // (self.merge**2)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> list[Encoded]:
        try:
            batch = self.ckpt.image_processor(images=images, return_tensors="pt")
        except ValueError as e:  # e.g. "absolute aspect ratio must be smaller than 200"
            raise ImageRejected(str(e)) from None
        if self.vision is None:
            raise RuntimeError("this engine was loaded without its vision tower")
        pixels = batch["pixel_values"].to(self.device, self.dtype)  # (patches of every image, C*T*P*P)
        grids = batch["image_grid_thw"].tolist()  # (images, 3)
        merged = self.vision(pixels, grids)  # (tokens of every image, hidden)
        sizes = [self.image_tokens(g) for g in grids]
        return [Encoded(e, g) for e, g in zip(torch.split(merged, sizes), grids, strict=True)]

    def positions(self, ids: torch.Tensor, images: list[Encoded]) -> tuple[torch.Tensor, int]:
        if not images:
            return torch.arange(ids.shape[0], device=self.device).expand(3, -1), 0
        input_ids = ids.view(1, -1)
        grid = torch.tensor([im.grid_thw for im in images], device=self.device)
        pos, delta = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=(input_ids == self.image_token_id).int(), image_grid_thw=grid
        )
        return pos[:, 0], int(delta.view(-1)[0])
