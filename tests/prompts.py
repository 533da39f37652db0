"""The engine's inputs for a user turn: prompt ids with the images encoded. Free of the broker's imports, so the
GPU tests (run with `--noconftest` on a machine without NATS or Mooncake) share it with the conftest."""

from __future__ import annotations

from typing import Any

from PIL import Image


def engine_prompt(ckpt: Any, family: Any, question: str, images: list[Image.Image]) -> tuple[list[int], list]:
    """A user turn with `images` then `question`, as prompt ids with the images encoded."""
    from epd.schemas.common import ImagePart, Message, TextPart
    from epd.workers.engine.prompt import build_prompt

    encoded = family.encode(images) if images else []
    content = [ImagePart(data=b"")] * len(images) + [TextPart(text=question)]
    ids = build_prompt(
        ckpt.tokenizer,
        ckpt.chat_template,
        [Message(role="user", content=content)],
        [family.image_tokens(e.grid_thw) for e in encoded],
        family.image_token_id,
    )
    return ids, encoded
