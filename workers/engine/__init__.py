"""Model execution: checkpoint loading, family adapters, sampling, detokenization."""

from __future__ import annotations

from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.family import Family


def load_family(ckpt: Checkpoint, device: str = "cpu", dtype: str = "float32") -> Family:
    """The adapter for a checkpoint's family (one file per family)."""
    if ckpt.family == "qwen2_vl":
        from epd.workers.engine.qwen2_vl import Qwen2VL

        return Qwen2VL(ckpt, device=device, dtype=dtype)
    raise AssertionError(f"unreachable: Checkpoint.open accepted {ckpt.family!r}")
