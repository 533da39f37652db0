"""Qwen2.5-VL: Qwen2-VL's interface, with windowed attention in the vision tower.

Our tower (`vision.py`, built windowed from this config) does the windowing and puts
its output back in image order, and the prompt's M-RoPE positions are computed the
same way for images, so the adapter is Qwen2-VL's; its own file is where a difference would go.
"""

from __future__ import annotations

from epd.workers.engine.qwen2_vl import Qwen2VL


class Qwen25VL(Qwen2VL):
    pass
