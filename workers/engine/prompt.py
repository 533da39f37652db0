"""Chat messages -> prompt token ids, with each image's placeholder expanded to its token count."""

from __future__ import annotations

from typing import Any

from epd.schemas.common import ImagePart, Message, TextPart


class PromptError(ValueError):
    pass


def template_messages(messages: list[Message]) -> list[dict]:
    out = []
    for m in messages:
        parts: list[dict] = []
        for p in m.content:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            elif isinstance(p, ImagePart):
                parts.append({"type": "image"})
        out.append({"role": m.role, "content": parts})
    return out


def build_prompt(
    tokenizer: Any, chat_template: str, messages: list[Message], image_tokens: list[int], image_token_id: int
) -> list[int]:
    """Token ids of the rendered chat; the i-th image pad becomes `image_tokens[i]` pads."""
    text = tokenizer.apply_chat_template(
        template_messages(messages), chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pads = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(pads) != len(image_tokens):
        raise PromptError(f"chat template rendered {len(pads)} image placeholders for {len(image_tokens)} images")
    out: list[int] = []
    prev = 0
    for pos, n in zip(pads, image_tokens, strict=True):
        out.extend(ids[prev:pos])
        out.extend([image_token_id] * n)
        prev = pos + 1
    out.extend(ids[prev:])
    return out
