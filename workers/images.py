"""Decoding client image bytes into RGB pictures, with a clear error for what is not an image."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # decompression-bomb bound


class BadImage(ValueError):
    pass


def open_image(data: bytes, index: int = 0) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if w * h > MAX_IMAGE_PIXELS:
                raise BadImage(f"image {index} is {w}x{h}, over the {MAX_IMAGE_PIXELS} pixel limit")
            probe.verify()
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"image {index} could not be decoded: {e}") from None
