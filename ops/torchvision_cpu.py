"""Lets PyPI's torchvision import beside the CPU build of torch (for vLLM's CPU build, `make vllm`).

PyPI's Linux torchvision wheels are CUDA builds: their `_C.so` links `libtorch_cuda.so`, which the CPU torch
lacks, so the library does not load, and `torchvision/_meta_registrations.py` then fails the whole import
(`operator torchvision::nms does not exist`) while registering fake kernels for `nms` and `qnms`. vLLM
imports transformers' Qwen2-VL image processor, which imports torchvision at module level.

This hook waits for the first `import torchvision`; then, only if the wheel's `_C.so` does not load, it
declares the two schemas (no kernels: the image transforms vLLM uses never call them; calling them raises
"no kernel"), so the import succeeds. A `.pth` line installs it in every process of the environment (vLLM
starts several); `make vllm` copies this file into site-packages as `epd_torchvision_cpu.py`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_held: list = []  # the Library object: the schemas live as long as it does


def declare_missing_ops(package_dir: Path) -> bool:
    """Declare torchvision's nms schemas unless its own `_C.so` loads; True when they were declared."""
    import torch

    for lib in package_dir.glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return False
        except OSError:
            break
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _held.append(library)
    return True


class _FirstImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once; the regular finders then import the package
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            declare_missing_ops(Path(next(iter(spec.submodule_search_locations))))
        return None


def install() -> None:
    if not any(isinstance(f, _FirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FirstImport())


install()
