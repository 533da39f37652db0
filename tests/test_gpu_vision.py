"""Our vision towers on CUDA (one non-causal Triton launch per layer) against the same towers on the CPU (SDPA per
image or window), float32 and bf16, at the real towers' width and head dim (1280 wide, 16 heads of 80).

Needs a CUDA device with triton; skipped where there is none (CI runs the CPU comparison, tests/test_vision.py).
Tolerances: float32 runs exact products in the kernel (not tf32): 1e-4 relative; bf16 rounds every layer's
activations: 3e-2 relative over a 4-block tower.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

# one pack: full windows, ragged edge windows, one image smaller than a window, and a 1,024-patch image
GRIDS = [[1, 32, 32], [1, 12, 20], [1, 4, 4], [1, 18, 10]]


def config(family: str):  # noqa: ANN201
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if family == "qwen2_5_vl":
        vision = {
            "depth": 4,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],
        }
        return Qwen2_5_VLConfig(vision_config=vision)
    vision = {"depth": 4, "embed_dim": 1280, "num_heads": 16, "hidden_size": 2048, "mlp_ratio": 4}
    return Qwen2VLConfig(vision_config=vision)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def towers(request: pytest.FixtureRequest):  # noqa: ANN201
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton")
    from epd.workers.engine.vision import tower_from_module
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    cfg = config(request.param)
    tower = (
        Qwen2_5_VisionTransformerPretrainedModel
        if request.param == "qwen2_5_vl"
        else Qwen2VisionTransformerPretrainedModel
    )
    visual = tower._from_config(cfg.vision_config, dtype=torch.float32).eval()  # the vision tower alone
    cpu = tower_from_module(visual, cfg, torch.device("cpu"), torch.float32)
    return cfg, visual, cpu


def pixels(cpu_tower, seed: int = 0) -> torch.Tensor:  # noqa: ANN001
    patches = sum(t * h * w for t, h, w in GRIDS)
    width = cpu_tower.in_channels * cpu_tower.temporal * cpu_tower.patch**2
    return torch.randn(patches, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_triton_tower_equals_the_cpu_tower(towers, dtype: torch.dtype, tolerance: float) -> None:  # noqa: ANN001
    from epd.workers.engine.vision import tower_from_module

    cfg, visual, cpu = towers
    gpu = tower_from_module(visual, cfg, torch.device("cuda"), dtype)
    px = pixels(cpu)
    with torch.inference_mode():
        want = cpu(px, GRIDS)
        got = gpu(px.to("cuda", dtype), GRIDS).float().cpu()
    assert got.shape == want.shape and torch.isfinite(got).all()
    err = relative_error(got, want)
    assert err < tolerance, f"relative error {err:.2e}"


def test_cuda_tower_equals_transformers_on_cuda(towers) -> None:  # noqa: ANN001
    """Against transformers' own tower on the same device, float32: the window order and tables on CUDA too."""
    from epd.workers.engine.vision import tower_from_module

    cfg, visual, cpu = towers
    gpu = tower_from_module(visual, cfg, torch.device("cuda"), torch.float32)
    px = pixels(cpu, seed=1).to("cuda")
    theirs = visual.to("cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    # transformers' patch embedding is a Conv3d, which cuDNN runs in TF32 by default (3e-4 off, measured on an
    # H200); ours is a float32 matmul
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            want = theirs(px, grid_thw=torch.tensor(GRIDS, device="cuda")).pooler_output
            got = gpu(px, GRIDS)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        visual.to("cpu")
    err = relative_error(got, want)
    assert err < 1e-4, f"relative error {err:.2e}"


@pytest.mark.parametrize("size", [(448, 448), (1024, 1024), (300, 200), (37, 900), (2000, 1500)])
def test_torch_preprocessing_on_cuda_gives_the_cpus_pixels_bit_for_bit(size: tuple[int, int]) -> None:
    """Pillow's integer resampling as float64 matmuls of exact integers: the device's summation order cannot
    change a value, so CUDA's float32 pixel values equal the CPU's (tests/test_image_preprocess.py holds the CPU's
    against the image processor)."""
    import numpy as np
    from epd.workers.engine.image_preprocess import TorchImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    proc = Qwen2VLImageProcessorPil()
    cpu, _ = TorchImageProcessor.for_processor(proc, "cpu", torch.float32)([image])
    gpu, _ = TorchImageProcessor.for_processor(proc, "cuda", torch.float32)([image])
    assert torch.equal(gpu.cpu(), cpu)
