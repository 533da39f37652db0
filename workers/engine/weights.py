"""Load a checkpoint's weights, all of them or one half: the vision tower, or the language model.

An encode worker never runs the language model and a decode worker never runs the
vision tower, so each loads only what it runs. The model's skeleton is built with
initialization off (its tensors are allocated, never written, so the untouched ones
never become resident), the other half is dropped, and the kept half's tensors are
read from the safetensors files: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`, as checkpoints come.

Checkpoints name tensors as the original Qwen-VL releases did (`visual.*`, `model.*`,
`lm_head.*`); transformers 5 nests them (`model.visual.*`, `model.language_model.*`).
Both spellings are read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from epd.workers.engine.checkpoint import Checkpoint, CheckpointError

Parts = Literal["all", "vision", "language"]
PARTS: tuple[str, ...] = ("all", "vision", "language")


def module_name(key: str) -> str:
    """A checkpoint tensor's name in the transformers 5 model."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not re.match(r"model\.(visual|language_model)\.", key):
        return "model.language_model." + key[len("model.") :]
    return key


def wanted(name: str, parts: Parts) -> bool:
    if parts == "all":
        return True
    is_vision = name.startswith("model.visual.")
    return is_vision if parts == "vision" else not is_vision


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{path} has no weights: neither model.safetensors nor model.safetensors.index.json")


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, parts: Parts = "all") -> Any:
    """The model with `parts` loaded; the other half is `None`."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    if parts not in PARTS:
        raise ValueError(f"parts {parts!r} is not one of {', '.join(PARTS)}")
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(ckpt.config, dtype=dtype)
    if parts == "vision":
        model.model.language_model, model.lm_head = None, None
    elif parts == "language":
        model.model.visual = None
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    loaded: set[str] = set()
    for file in shard_files(ckpt.path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = module_name(key)
                if not wanted(name, parts):
                    continue
                if name not in params:
                    raise CheckpointError(f"{file.name}: tensor {key!r} does not belong to {type(model).__name__}")
                with torch.no_grad():
                    params[name].copy_(f.get_tensor(key))
                loaded.add(name)
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and model.lm_head is not None:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(n for n, _ in model.named_parameters() if n not in loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt.path}: the checkpoint lacks {shown}")
    return model.to(device).eval()
