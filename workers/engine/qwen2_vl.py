"""Qwen2-VL: our vision tower (`vision.py`) over the image processor's patches, and M-RoPE positions for a
prompt through transformers' position code."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.family import Encoded, Family, ImageRejected
from epd.workers.engine.image_preprocess import TorchImageProcessor, Unsupported
from epd.workers.engine.vision import tower_from_module
from epd.workers.engine.weights import Parts, load_model, text_from_model
from PIL import Image

log = logging.getLogger(__name__)


class Qwen2VL(Family):
    def __init__(
        self,
        ckpt: Checkpoint,
        device: str = "cpu",
        dtype: str = "float32",
        parts: Parts = "all",
        model: Any = None,
        preprocess: str = "auto",
    ) -> None:
        """`model`: a transformers model already built (benchmarks build random weights on the device instead of
        loading); the language model and vision tower are then ours with its weights, and `model` keeps its own
        (the baseline). `preprocess`: "processor", "torch" or "auto" (torch where the tower runs on CUDA)."""
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
        self.preprocessor = self._preprocessor(preprocess)
        self._stream: torch.cuda.Stream | None = None  # CUDA: the stream images are uploaded and preprocessed on

    def _preprocessor(self, preprocess: str) -> TorchImageProcessor | None:
        """The torch preprocessing, or None for the image processor (the CPU's default: the oracle's own path)."""
        if preprocess == "processor" or (preprocess == "auto" and self.device.type != "cuda"):
            return None
        try:
            return TorchImageProcessor.for_processor(self.ckpt.image_processor, self.device, self.dtype)
        except Unsupported as e:
            if preprocess == "torch":
                raise ValueError(f"EPD_IMAGE_PREPROCESS=torch: {e}") from None
            log.info("images are preprocessed by the image processor: %s", e)
            return None

    def image_tokens(self, grid_thw: list[int]) -> int:
        t, h, w = grid_thw
        return t * h * w // (self.merge**2)

    @torch.inference_mode()
    def prepare(self, images: list[Image.Image | np.ndarray]) -> tuple[torch.Tensor, list[list[int]]]:
        """pixel_values (patches of every image, C*T*P*P) on the device in the tower's dtype, and each image's grid.
        Images: RGB pictures, or (H, W, 3) uint8 arrays (the torch path takes these without a PIL round trip).

        On CUDA the upload and the preprocessing run on a stream of their own and are complete on return: the
        encoder prepares the next batch in another thread while the current one's forward holds the default
        stream, and neither waits for the other."""
        if self.device.type != "cuda":
            return self._prepare(images)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            pixels, grids = self._prepare(images)
        self._stream.synchronize()
        # the tower reads it on the default stream: its memory is not reused before that reading is done
        pixels.record_stream(torch.cuda.default_stream(self.device))
        return pixels, grids

    def _prepare(self, images: list[Image.Image | np.ndarray]) -> tuple[torch.Tensor, list[list[int]]]:
        try:
            if self.preprocessor is not None:
                return self.preprocessor([np.asarray(im) for im in images])
            pictures = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in images]
            batch = self.ckpt.image_processor(images=pictures, return_tensors="pt")
        except ValueError as e:  # e.g. "absolute aspect ratio must be smaller than 200"
            raise ImageRejected(str(e)) from None
        return batch["pixel_values"].to(self.device, self.dtype), batch["image_grid_thw"].tolist()

    @torch.inference_mode()
    def encode_prepared(self, pixels: torch.Tensor, grids: list[list[int]]) -> list[Encoded]:
        """The tower over `prepare`'s output: each image's merged embedding (on the device)."""
        if self.vision is None:
            raise RuntimeError("this engine was loaded without its vision tower")
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
