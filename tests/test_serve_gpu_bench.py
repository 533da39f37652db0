"""bench/serve_gpu.py on the CPU at a tiny size: every step of the GPU serving benchmark runs from a fresh clone."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):  # noqa: ANN201 - a script, not a package
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_step_measures_every_request(tmp_path: Path) -> None:
    bench = load("serve_gpu")
    out = tmp_path / "serve_gpu.json"
    argv = ["--model-dir", str(tmp_path / "ckpt"), "--small", "--device", "cpu", "--dtype", "float32"]
    argv += ["--topologies", "e-p-d", "--rates", "inf", "--text-rates", "inf", "--num-prompts", "4", "--warmup", "2"]
    argv += ["--probe", "2", "--flood", "1", "--flood-ramp-s", "0.5", "--input-len", "16", "--output-len", "6"]
    argv += ["--image-size", "112", "--max-images", "2", "--kv-cache-mb", "128", "--kv-buffer-mb", "32"]
    argv += ["--segment-mb", "64", "--out", str(out), "--plot", str(tmp_path / "serve_gpu.png")]
    bench.main(argv)
    result = json.loads(out.read_text())["results"]["e-p-d"]
    assert "error" not in result, result["error"]
    for run in result["random_mm"] + result["text"]:
        assert run["completed"] == 4 and run["output_lens"] == [6] * 4, run["errors"]
    for probe in (result["flood"]["unloaded"], result["flood"]["flooded"], result["repeated_images"]["new"]):
        assert probe["n"] == 2 and probe["failed"] == 0
    assert result["flood"]["flood"]["n"] >= 1 and result["flood"]["flood"]["failed"] == 0
    busy = result["cpu_text"]
    assert {"encode-0", "prefill-0", "decode-0", "gateway", "bench client"} <= set(busy["cores"])
    assert busy["engine"]["decode_step_ms"] > 0  # the decoder's own counter, read from its metrics endpoint
    for kind in ("image", "text"):
        split = result["pipeline_cost"][kind]
        assert split["n"] == 2 and split["pipeline_ms"]["p50"] > 0
    assert (tmp_path / "serve_gpu.png").read_bytes()[:4] == b"\x89PNG"
