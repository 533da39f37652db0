"""A local Hugging Face checkpoint directory: tokenizer, image processor, chat template, config.

Nothing is downloaded: every `from_pretrained` is given a directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_FAMILIES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    path: Path
    config: Any
    tokenizer: Any
    image_processor: Any
    chat_template: str

    @property
    def family(self) -> str:
        return self.config.model_type

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} is not a checkpoint directory: no config.json")
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in SUPPORTED_FAMILIES:
            names = ", ".join(f"{v} ({k})" for k, v in SUPPORTED_FAMILIES.items())
            raise CheckpointError(f"{path}: model type {config.model_type!r} is not supported; supported: {names}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
        return cls(path, config, tokenizer, image_processor, _chat_template(path, tokenizer))

    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = self.path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def max_model_len(self) -> int:
        text = getattr(self.config, "text_config", self.config)
        return int(text.max_position_embeddings)


def _chat_template(path: Path, tokenizer: Any) -> str:
    """The template as checkpoints ship it: `chat_template.jinja`, `chat_template.json`, or the tokenizer's."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise CheckpointError(f"{path} has no chat template (chat_template.jinja, chat_template.json or tokenizer)")
