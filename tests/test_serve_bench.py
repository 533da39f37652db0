"""bench/serve.py against a running cluster: a tiny configuration, as the smoke test of the serving benchmark."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from epd.ops.up import Cluster

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "serve.py"


def load_bench():  # noqa: ANN201 - the script is no package
    spec = importlib.util.spec_from_file_location("serve_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_serve_bench_measures_every_request_and_judges_goodput(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    bench = load_bench()
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    common = ["--base-url", cluster.base_url, "--model", cluster.settings.model_name, "--tokenizer", str(tiny_model)]
    common += ["--num-prompts", "6", "--input-len", "12", "--output-len", "5", "--image-size", "56"]
    common += ["--max-images", "2", "--out", str(out), "--label", cluster.settings.topology]
    runs = bench.main([*common, "--workload", "random-mm", "--request-rate", "inf", "8", "--goodput", "ttft:1e9"])
    assert len(runs) == 2
    for run in runs:
        assert run["completed"] == 6, run["errors"]
        assert run["output_lens"] == [5] * 6  # ignore_eos: every request runs to max_tokens
        assert all(n > 12 for n in run["input_lens"])  # 12 text tokens, the chat template and the images
        assert all(0 < t <= run["p99_e2el_ms"] / 1e3 for t in run["ttfts"])  # p99 of 6 is the slowest
        assert run["request_goodput"] == pytest.approx(run["request_throughput"])  # a limit nobody misses
        assert run["p50_ttft_ms"] <= run["p90_ttft_ms"] <= run["p99_ttft_ms"]
    saved = json.loads(out.read_text())
    assert [r["request_rate"] for r in saved["runs"]] == ["inf", 8.0]

    text = bench.main([*common, "--workload", "text", "--goodput", "ttft:0", "--plot", str(png)])[0]
    assert text["completed"] == 6 and text["request_goodput"] == 0  # nobody's first token comes in 0 ms
    # text prompts are shorter than the image ones: no image tokens
    assert max(text["input_lens"]) < min(runs[0]["input_lens"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeated_images_come_from_the_pool() -> None:
    bench = load_bench()
    args = bench.parse_args(["--model", "m", "--workload", "repeated-mm", "--image-pool", "3", "--image-size", "32"])
    prompts = bench.Prompts(args)
    urls = {
        part["image_url"]["url"]
        for _ in range(20)
        for part in prompts.body()["messages"][0]["content"]
        if part["type"] == "image_url"
    }
    assert urls <= set(prompts.pool) and len(prompts.pool) == 3


def test_a_bad_goodput_flag_is_refused_naming_it() -> None:
    with pytest.raises(SystemExit, match="not 'ttfb:10'"):
        load_bench().parse_args(["--goodput", "ttfb:10"])
