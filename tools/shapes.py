"""Synthetic pictures for the demo model: one filled shape in a color on a plain background.

`draw(rng)` returns the picture and its truth; the demo model is trained on these,
and the tests grade it on fresh ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 215, 20),
}
SHAPES = ("circle", "square", "triangle")

# Backgrounds are neutral (grays from near-black to white), so a color word names the shape alone.
MIN_SIDE, MAX_SIDE = 48, 512

COLOR_QUESTIONS = ("What color is the shape?", "What color is it?", "Which color is the shape?")
SHAPE_QUESTIONS = ("What shape is it?", "What shape is this?", "Which shape is in the image?")
DESCRIBE_QUESTIONS = ("Describe the image.", "What is in the image?")


@dataclass(frozen=True)
class Picture:
    image: Image.Image
    color: str
    shape: str

    def answer(self, question: str) -> str:
        """The demo model's expected answer to one of the known questions."""
        if question in COLOR_QUESTIONS:
            return self.color
        if question in SHAPE_QUESTIONS:
            return self.shape
        if question in DESCRIBE_QUESTIONS:
            return f"a {self.color} {self.shape}"
        raise ValueError(f"not a demo question: {question!r}")


def draw(
    rng: random.Random, color: str | None = None, shape: str | None = None, size: tuple[int, int] | None = None
) -> Picture:
    """A random picture; `color`, `shape` and `size` (width, height) pin what they name."""
    color = color or rng.choice(list(COLORS))
    shape = shape or rng.choice(SHAPES)
    w, h = size or (rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE))
    gray = rng.randint(0, 255)
    image = Image.new("RGB", (w, h), (gray, gray, gray))
    side = rng.uniform(0.45, 0.9) * min(w, h)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + side / 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=fill)
    return Picture(image, color, shape)
