"""The Qwen2-VL / Qwen2.5-VL image processor as torch operations, on the tower's device.

From decoded RGB pixels, (H, W, 3) uint8, to the processor's `pixel_values` (patches, C*T*P*P) and
`image_grid_thw`: the same smart resize (sides to multiples of patch * merge, area within the processor's
min and max pixels), Pillow's bicubic resampling, rescale, normalise, the temporal repeat and the same
patch order. It runs wherever the tensors are (CUDA in production, the CPU in tests).

How close, and the tolerance accepted. The arithmetic is Pillow's own, not an approximation of it:

- Pillow resizes an 8-bit image in two passes, each with integer coefficients (the filter's weights,
  normalised and scaled by 2^22, rounded half away from zero) and an integer sum rounded and clipped back
  to 8 bits. Here the coefficients are computed as Pillow computes them (float64, the same expressions, the
  same summation order) and each pass is a float64 matmul of integers below 2^53: every product and partial
  sum is exact whatever order the device sums in, so each pass gives Pillow's 8-bit values exactly.
  (`torch.nn.functional.interpolate(..., antialias=True)` uses Pillow's kernel too, but in floating point
  without the rounding to 8 bits between the passes.)
- Rescale and normalise see only 256 values per channel after the resize: a (3, 256) table computed once
  with the processor's own numpy arithmetic (float64 rescale cast to float32, then float32 subtract and
  divide) gives exactly the processor's float32 values (cast to the tower's dtype as its output would be).
- The patch order is a permutation: the processor's reshape and transpose, in torch.

So the result equals the processor's bit for bit whenever both resample the width first, as every Pillow up
to 12 always does. Pillow 13 (the locked version) resamples the height first in some downscales ("when the
height is scaled down significantly more than the width", its PR 9549), by a criterion it does not document
and that its outputs did not reveal (a ratio rule fitted on random sizes failed on the demo pictures); there
the two 8-bit roundings happen in the other order, and a few values differ by several levels. Measured on the
CPU (`python bench/image_preprocess_cpu.py --pictures 200`, bench/results/image_preprocess_cpu.json): every
upscale and every image already at its size is exact, as are 448x448 and 1024x1024 (to 980x980) through
Qwen2.5-VL's default processor; over the demo's
pictures (48..512 px, downscaled to at most 140x140) about a fifth of the images have some values that
differ, 0.07% of all values, max abs 0.18 and mean abs 1.2e-5 (normalised units, one 8-bit level is about
0.015); smooth photo-like images 1 to 2 levels; raw noise, resampling's worst case, up to 0.34. That is the
difference between Pillow 12 and 13 on the same image, so the reference itself moves that much with a Pillow
upgrade: the accepted tolerance is max abs 0.5, at most 1% of values differing, mean abs 1e-3, and the demo
model's answers unchanged (`tests/test_image_preprocess.py` asserts these, and the exact cases).

An image's content key does not name the path: an encoder on CUDA (torch) and one on the CPU (processor)
may store embeddings of one key that differ by the above; the processor path stays the CPU's default, which
the oracle tests use.

Cost on a device: two float64 matmuls per resized image, (3H, W) @ (W, W') and (H', H) @ (H, 3W'): for a
1024x1024 image to 1036x1036 about 13 GFLOP, a fraction of a millisecond on an H200; an image already at
its target size (448x448) is not resampled at all.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

BICUBIC, BILINEAR = 3, 2  # PIL's resample codes
_SUPPORT = {BICUBIC: 2.0, BILINEAR: 1.0}
_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2
MAX_ASPECT = 200


class Unsupported(ValueError):
    """The processor is configured in a way this module does not reproduce (then the processor itself runs)."""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's target size: each side a multiple of `factor`, the area within [min, max] pixels, the
    aspect ratio kept as near as that allows. ValueError for an aspect ratio over 200 (the processor's)."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT}, got {max(height, width) / min(height, width)}"
        )
    h, w = round(height / factor) * factor, round(width / factor) * factor  # Python's round: half to even
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return h, w


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), the same float64 expressions in the same order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


@lru_cache(maxsize=256)
def resample_matrix(in_size: int, out_size: int, resample: int = BICUBIC) -> np.ndarray:
    """(out_size, in_size) float64 of Pillow's integer coefficients for one axis (its `precompute_coeffs`
    then `normalize_coeffs_8bpc`): row j holds the weights of output pixel j, times 2^22, rounded."""
    support_unit, kernel = _SUPPORT[resample], _bicubic if resample == BICUBIC else _bilinear
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support_unit * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): toward zero, then clamped at 0
    hi = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    count = hi - lo
    x = np.arange(taps)[None, :]
    weights = kernel((x + lo[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(x < count[:, None], weights, 0.0)
    total = np.zeros(out_size)
    for t in range(taps):  # summed tap by tap, in Pillow's order: the division then rounds as Pillow's does
        total = total + weights[:, t]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << _BITS)
    fixed = np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5))
    out = np.zeros((out_size, in_size))
    cols = lo[:, None] + x
    keep = x < count[:, None]
    out[np.nonzero(keep)[0], cols[keep]] = fixed[keep]
    return out


def _pass(image: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """One axis of the resize: the last axis of `image` (..., in) uint8 against coeffs (out, in): uint8 (..., out),
    Pillow's rounding (the sum plus half a unit, shifted right) and clipping to 0..255."""
    acc = image.to(torch.float64) @ coeffs.T  # exact: integers, every partial sum under 2^53
    return torch.floor((acc + (1 << (_BITS - 1))) / (1 << _BITS)).clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Settings:
    """The processor's settings that change the pixels (those `connectors/keys.py` puts in the content key)."""

    min_pixels: int
    max_pixels: int
    patch: int
    merge: int
    temporal: int
    resample: int
    rescale: float | None  # None: no rescale
    mean: tuple[float, ...] | None  # None: no normalisation
    std: tuple[float, ...] | None

    @classmethod
    def of(cls, processor: Any) -> Settings:
        """The settings of a transformers Qwen2-VL image processor; Unsupported for what is not reproduced here."""
        size = processor.size
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        if not getattr(processor, "do_resize", True):
            raise Unsupported("do_resize is off")
        if int(processor.resample) not in _SUPPORT:
            raise Unsupported(f"resample {processor.resample} is not bicubic or bilinear")
        rescale = float(processor.rescale_factor) if processor.do_rescale else None
        normalize = processor.do_normalize
        return cls(
            min_pixels=int(get("shortest_edge")),
            max_pixels=int(get("longest_edge")),
            patch=int(processor.patch_size),
            merge=int(processor.merge_size),
            temporal=int(processor.temporal_patch_size),
            resample=int(processor.resample),
            rescale=rescale,
            mean=tuple(float(m) for m in processor.image_mean) if normalize else None,
            std=tuple(float(s) for s in processor.image_std) if normalize else None,
        )

    def value_table(self) -> torch.Tensor:
        """(3, 256) float32: what the processor makes of each 8-bit value of each channel, its arithmetic exactly
        (numpy: float64 rescale cast to float32, then float32 (x - mean) / std)."""
        levels = np.arange(256, dtype=np.uint8)
        x = (levels.astype(np.float64) * self.rescale).astype(np.float32) if self.rescale else levels.astype(np.float32)
        x = np.broadcast_to(x, (3, 256))
        if self.mean is not None:
            mean, std = np.array(self.mean, dtype=np.float32), np.array(self.std, dtype=np.float32)
            x = (x - mean[:, None]) / std[:, None]
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


class TorchImageProcessor:
    """The image processor's `pixel_values` and `image_grid_thw`, computed with torch on `device`.

    Coefficient matrices are kept per (input size, output size) on the device (an LRU), and the value table once.
    """

    def __init__(self, settings: Settings, device: torch.device | str, dtype: torch.dtype) -> None:
        self.settings, self.device, self.dtype = settings, torch.device(device), dtype
        self._table = settings.value_table().to(self.device).to(dtype)  # (3, 256), cast as the processor's output
        self._coeffs: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def for_processor(cls, processor: Any, device: torch.device | str, dtype: torch.dtype) -> TorchImageProcessor:
        return cls(Settings.of(processor), device, dtype)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) in patches of an image of this size (ValueError: an aspect ratio the processor refuses)."""
        s = self.settings
        h, w = smart_resize(height, width, s.patch * s.merge, s.min_pixels, s.max_pixels)
        return 1, h // s.patch, w // s.patch

    def __call__(self, images: list[torch.Tensor | np.ndarray]) -> tuple[torch.Tensor, list[list[int]]]:
        """(H, W, 3) uint8 images (host or device) -> pixel_values (patches of all, C*T*P*P) in `dtype` on the
        device, and each image's grid [t, h, w]. Raises ValueError for an image the processor would refuse."""
        grids = [list(self.grid(int(im.shape[0]), int(im.shape[1]))) for im in images]  # refuse before any work
        pixels = [self._one(im, g) for im, g in zip(images, grids, strict=True)]
        return torch.cat(pixels), grids

    def _one(self, image: torch.Tensor | np.ndarray, grid: list[int]) -> torch.Tensor:
        s = self.settings
        if isinstance(image, np.ndarray):
            with warnings.catch_warnings():  # PIL's arrays are read-only; this tensor is only read
                warnings.simplefilter("ignore", UserWarning)
                image = torch.from_numpy(image)
        x = image.to(self.device).permute(2, 0, 1)  # (3, H, W) uint8: the one upload, 1 byte a pixel channel
        _, gh, gw = grid
        x = self._resize(x, gh * s.patch, gw * s.patch)
        values = self._table[torch.arange(3, device=self.device)[:, None, None], x.long()]  # (3, H', W') dtype
        return patchify(values, s.patch, s.merge, s.temporal)

    def _resize(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, height, width) uint8 as Pillow resizes: one pass per axis that changes, each
        rounded to 8 bits, the width first (see the module's doc for Pillow 13's exceptions)."""
        _, h, w = x.shape
        if w != width:
            x = _pass(x, self._matrix(w, width))
        if h != height:
            x = _pass(x.transpose(1, 2), self._matrix(h, height)).transpose(1, 2)
        return x

    def _matrix(self, n: int, m: int) -> torch.Tensor:
        hit = self._coeffs.get((n, m))
        if hit is None:
            hit = torch.from_numpy(resample_matrix(n, m, self.settings.resample)).to(self.device)
            self._coeffs[(n, m)] = hit
            if len(self._coeffs) > 64:  # a bound: images come in many sizes
                self._coeffs.pop(next(iter(self._coeffs)))
        return hit


def patchify(image: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(C, H, W) -> (H/P * W/P, C*T*P*P) in the processor's order: merge-size squares of patches row by row,
    within each the patches row by row; each patch's pixels channel-major, the frame repeated T times."""
    c, h, w = image.shape
    gh, gw = h // patch, w // patch
    x = image.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = x.unsqueeze(5).expand(*x.shape[:5], temporal, patch, patch)
    return x.reshape(gh * gw, c * temporal * patch * patch)
