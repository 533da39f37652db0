import json
import shutil
from pathlib import Path

import pytest
from epd.connectors.keys import KeySpace

from .conftest import png_bytes

pytestmark = pytest.mark.unit


def test_same_image_same_key_across_instances(tiny_model: Path) -> None:
    a, b = KeySpace.for_checkpoint(tiny_model), KeySpace.for_checkpoint(tiny_model)
    assert a.key(png_bytes()) == b.key(png_bytes())
    assert a.key(png_bytes()) != a.key(png_bytes(color=(0, 0, 255)))
    assert a.key(png_bytes(), "image") != a.key(png_bytes(), "video")


def test_processor_settings_and_weights_change_the_key(tiny_model: Path, tmp_path: Path) -> None:
    base = KeySpace.for_checkpoint(tiny_model).key(png_bytes())
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "preprocessor_config.json").read_text())
    cfg["image_mean"] = [0.5, 0.5, 0.5]
    (other / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert KeySpace.for_checkpoint(other).key(png_bytes()) != base

    weights = tmp_path / "weights"
    shutil.copytree(tiny_model, weights)
    st = weights / "model.safetensors"
    data = bytearray(st.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 3] ^= 0xFF  # one byte of the first tensor
    st.write_bytes(bytes(data))
    assert KeySpace.for_checkpoint(weights).key(png_bytes()) != base
