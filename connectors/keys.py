"""Encoder-cache keys: a content hash, so the same image lands on one key everywhere.

key = sha256(model identity, pixel-changing processor settings, modality, media bytes).
Model identity hashes the checkpoint's config, its weight files' headers and a
sample of their bytes: cheap for a 15 GB checkpoint, different for different
weights of the same shape. Reads files only: the gateway needs no torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# Settings of the image processor that change the pixels the encoder sees.
PIXEL_SETTINGS = (
    "do_resize",
    "size",
    "min_pixels",
    "max_pixels",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
)
_SAMPLE = 1 << 16


def model_identity(model_dir: Path) -> str:
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))  # header: names, shapes, dtypes, offsets
            h.update(fh.read(_SAMPLE))  # the first bytes of the data
    return h.hexdigest()


def processor_settings(model_dir: Path) -> dict:
    path = model_dir / "preprocessor_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    return {k: cfg[k] for k in PIXEL_SETTINGS if k in cfg}


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Computes keys for one model; build it once per process."""

    prefix: str  # digest of model identity and processor settings

    @classmethod
    def for_checkpoint(cls, model_dir: Path) -> KeySpace:
        h = hashlib.sha256(model_identity(model_dir).encode())
        h.update(json.dumps(processor_settings(model_dir), sort_keys=True).encode())
        return cls(prefix=h.hexdigest()[:16])

    def key(self, media: bytes, modality: str = "image") -> str:
        digest = hashlib.sha256(modality.encode() + b"\0" + media).hexdigest()
        return f"{self.prefix}-{modality}-{digest}"
