"""Load a checkpoint's weights, all of them or one half: the vision tower, or the language model.

An encode worker never runs the language model and a decode worker never runs the
vision tower, so each loads only what it runs. Both are the project's own: the vision tower
(`vision.py`, its gate/up projections fused at load) and the language model (`qwen2_text.py`,
its fused projections filled from the checkpoint's separate tensors). transformers' model
skeleton is still built, with initialization off and both halves dropped, for its M-RoPE
position code. Both read the safetensors files: one `model.safetensors`,
or shards listed in `model.safetensors.index.json`, as checkpoints come.

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
from epd.workers.engine.qwen2_text import Qwen2Text
from epd.workers.engine.vision import VisionTower, empty_tower

LANGUAGE = "model.language_model."
VISUAL = "model.visual."

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


def load_model(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, parts: Parts = "all"
) -> tuple[Any, Qwen2Text | None, VisionTower | None]:
    """transformers' model skeleton without weights (both halves dropped: its position code only), our language
    model (`None` unless `parts` has it) and our vision tower (`None` unless `parts` has it)."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    if parts not in PARTS:
        raise ValueError(f"parts {parts!r} is not one of {', '.join(PARTS)}")
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(ckpt.config, dtype=dtype)
    model.model.language_model, model.lm_head, model.model.visual = None, None, None
    text = None if parts == "vision" else Qwen2Text(ckpt.config.get_text_config(), device, dtype)
    vision = None if parts == "language" else empty_tower(ckpt.config, device, dtype)
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    loaded: set[str] = set()
    for file in shard_files(ckpt.path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = module_name(key)
                if not wanted(name, parts):
                    continue
                if text is not None and (name.startswith(LANGUAGE) or name == "lm_head.weight"):
                    try:
                        loaded.add(text.load_weight(name.removeprefix(LANGUAGE), f.get_tensor(key)))
                    except KeyError:
                        raise CheckpointError(
                            f"{file.name}: tensor {key!r} does not belong to the language model"
                        ) from None
                    continue
                if vision is not None and name.startswith(VISUAL):
                    try:
                        loaded.add(VISUAL + vision.load_weight(name.removeprefix(VISUAL), f.get_tensor(key)))
                    except KeyError:
                        raise CheckpointError(
                            f"{file.name}: tensor {key!r} does not belong to the vision tower"
                        ) from None
                    continue
                if name not in params:
                    raise CheckpointError(f"{file.name}: tensor {key!r} does not belong to {type(model).__name__}")
                with torch.no_grad():
                    params[name].copy_(f.get_tensor(key))
                loaded.add(name)
    expected = {n for n, _ in model.named_parameters()} | (text.expected_keys() if text is not None else set())
    if vision is not None:
        expected |= {VISUAL + n for n in vision.expected_keys()}
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt.path}: the checkpoint lacks {shown}")
    return model.to(device).eval(), text, vision


def text_from_model(model: Any, device: torch.device, dtype: torch.dtype) -> Qwen2Text:
    """Our language model with the weights of a transformers model built in memory (benchmarks)."""
    text = Qwen2Text(model.config.get_text_config(), device, dtype)
    for name, p in model.model.language_model.named_parameters():
        text.load_weight(name, p)
    if model.lm_head is not None:
        text.load_weight("lm_head.weight", model.lm_head.weight)
    return text
