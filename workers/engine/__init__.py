"""Model execution: checkpoint loading, family adapters, the KV cache, sampling, detokenization."""

from __future__ import annotations

import importlib

import torch
from epd.workers.engine.checkpoint import SUPPORTED_FAMILIES, Checkpoint
from epd.workers.engine.family import Family
from epd.workers.engine.weights import Parts

# model_type -> (module, class): a new family is one module and one line here (and its name in SUPPORTED_FAMILIES).
ADAPTERS = {
    "qwen2_vl": ("epd.workers.engine.qwen2_vl", "Qwen2VL"),
    "qwen2_5_vl": ("epd.workers.engine.qwen2_5_vl", "Qwen25VL"),
}
assert ADAPTERS.keys() == SUPPORTED_FAMILIES.keys()


def prepare_device(device: str) -> torch.device:
    """Check that `device` exists here; `npu:N` imports torch_npu, which nothing else does."""
    kind = device.split(":")[0]
    if kind == "npu":
        try:
            importlib.import_module("torch_npu")
        except ImportError:
            raise ValueError(f"device {device!r} needs the torch_npu package, which is not installed") from None
    elif kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device")
    elif kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not cpu, cuda[:N] or npu[:N]")
    return torch.device(device)


def load_family(
    ckpt: Checkpoint, device: str = "cpu", dtype: str = "float32", parts: Parts = "all", preprocess: str = "auto"
) -> Family:
    """The adapter for a checkpoint's family, with `parts` of its weights loaded; `preprocess`: where images are
    preprocessed (`EPD_IMAGE_PREPROCESS`: processor, torch, or auto: torch where the tower runs on CUDA)."""
    prepare_device(device)
    module, name = ADAPTERS[ckpt.family]
    adapter = getattr(importlib.import_module(module), name)
    return adapter(ckpt, device=device, dtype=dtype, parts=parts, preprocess=preprocess)
