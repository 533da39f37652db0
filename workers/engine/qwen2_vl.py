"""Qwen2-VL through transformers' classes: vision tower, M-RoPE positions, DynamicCache."""

from __future__ import annotations

import torch
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.family import DecodeState, Encoded, Family, ImageRejected, Prefilled
from PIL import Image
from transformers import AutoModelForImageTextToText, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling


class Qwen2VL(Family):
    def __init__(self, ckpt: Checkpoint, device: str = "cpu", dtype: str = "float32") -> None:
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.model = AutoModelForImageTextToText.from_pretrained(ckpt.path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
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
        pixels = batch["pixel_values"].to(self.device, self.model.model.visual.dtype)  # (patches, C*T*P*P)
        grid = batch["image_grid_thw"].to(self.device)  # (images, 3)
        merged = self.model.model.visual(pixels, grid_thw=grid).pooler_output  # (tokens, hidden)
        sizes = [self.image_tokens(g) for g in grid.tolist()]
        return [Encoded(e, g) for e, g in zip(torch.split(merged, sizes), grid.tolist(), strict=True)]

    @torch.inference_mode()
    def prefill(self, ids: list[int], images: list[Encoded]) -> Prefilled:
        input_ids = torch.tensor([ids], device=self.device)
        text_pos = torch.arange(len(ids), device=self.device).view(1, 1, -1)
        kwargs: dict = {}
        if images:
            grid = torch.tensor([im.grid_thw for im in images], device=self.device)
            mm_types = (input_ids == self.image_token_id).int()
            vision_pos, delta = self.model.model.get_rope_index(
                input_ids, mm_token_type_ids=mm_types, image_grid_thw=grid
            )
            embeds = tuple(im.embedding.to(self.device) for im in images)
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=embeds)}
            rope_delta = int(delta.view(-1)[0])
        else:
            vision_pos, rope_delta = text_pos.expand(3, 1, -1), 0
        cache = DynamicCache(config=self.config)
        out = self.model(
            input_ids=input_ids,
            position_ids=torch.cat([text_pos, vision_pos], dim=0),  # (4, 1, L): text, then t/h/w
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        kv = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in cache.layers])
        return Prefilled(kv=kv, logits=out.logits[0, -1], rope_delta=rope_delta)

    def start_decode(self, kv: torch.Tensor, rope_delta: int) -> DecodeState:
        cache = DynamicCache(config=self.config)
        kv = kv.to(self.device)
        for i in range(kv.shape[0]):
            cache.update(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0), i)
        return DecodeState(cache=cache, position=kv.shape[3], rope_delta=rope_delta)

    @torch.inference_mode()
    def decode(self, state: DecodeState, token: int) -> torch.Tensor:
        text = torch.full((1, 1, 1), state.position, device=self.device)
        out = self.model(
            input_ids=torch.tensor([[token]], device=self.device),
            position_ids=torch.cat([text, (text + state.rope_delta).expand(3, 1, 1)], dim=0),
            past_key_values=state.cache,
            use_cache=True,
        )
        state.position += 1
        return out.logits[0, -1]
