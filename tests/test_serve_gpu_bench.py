"""bench/serve_gpu.py on the CPU at a tiny size: every step of the GPU serving benchmark runs from a fresh clone."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from epd.ops.processes import free_port, port_open

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):  # noqa: ANN201 - a script, not a package
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def tiny(tmp_path: Path) -> list[str]:
    """Every step at its smallest, on the small checkpoint (built in tmp_path/ckpt) on the CPU."""
    argv = ["--model-dir", str(tmp_path / "ckpt"), "--small", "--device", "cpu", "--dtype", "float32"]
    argv += ["--rates", "inf", "--text-rates", "inf", "--num-prompts", "4", "--warmup", "2"]
    argv += ["--probe", "2", "--flood", "1", "--flood-ramp-s", "0.5", "--input-len", "16", "--output-len", "6"]
    argv += ["--image-size", "112", "--max-images", "2", "--kv-cache-mb", "128", "--kv-buffer-mb", "32"]
    return argv + ["--segment-mb", "64", "--out", str(tmp_path / "serve_gpu.json")]


def test_every_step_measures_every_request(tmp_path: Path) -> None:
    bench = load("serve_gpu")
    out = tmp_path / "serve_gpu.json"
    bench.main([*tiny(tmp_path), "--topologies", "e-p-d", "--plot", str(tmp_path / "serve_gpu.png")])
    result = json.loads(out.read_text())["results"]["e-p-d"]
    assert "error" not in result, result["error"]
    for run in result["random_mm"] + result["text"]:
        assert run["completed"] == 4 and run["output_lens"] == [6] * 4, run["errors"]
    for probe in (result["flood"]["unloaded"], result["flood"]["flooded"], result["repeated_images"]["new"]):
        assert probe["n"] == 2 and probe["failed"] == 0
    assert result["flood"]["flood"]["n"] >= 1 and result["flood"]["flood"]["failed"] == 0
    slowest = result["flood"]["flooded_slowest"]  # the flooded text probes' TTFT, split from their spans
    assert len(slowest) == 2 and slowest[0]["ttft_ms"] >= slowest[1]["ttft_ms"] > 0
    assert (
        sum(slowest[0]["hops_ms"].values()) <= slowest[0]["ttft_ms"] and slowest[0]["spans_ms"]["prefill.forward"] > 0
    )
    busy = result["cpu_text"]
    assert {"encode-0", "prefill-0", "decode-0", "gateway", "bench client"} <= set(busy["cores"])
    assert busy["engine"]["decode_step_ms"] > 0  # the decoder's own counter, read from its metrics endpoint
    assert {"gateway", "encode-0", "prefill-0", "decode-0"} <= set(result["flood"]["loop_lag"])  # every process's
    for kind in ("image", "text"):
        split = result["pipeline_cost"][kind]
        assert split["n"] == 2 and split["pipeline_ms"]["p50"] > 0
    assert (tmp_path / "serve_gpu.png").read_bytes()[:4] == b"\x89PNG"


def test_a_server_started_from_a_command_gets_the_same_loads(tmp_path: Path) -> None:
    """--server: any OpenAI-compatible server (on the GPU, `vllm serve`); here `epd up` itself, as a command."""
    bench = load("serve_gpu")
    port = free_port()
    up = f"{sys.executable} -m epd.ops.cli up --model {tmp_path / 'ckpt'} --topology epd --port {port}"
    up += f" --workdir {tmp_path / 'up'}"
    argv = [*tiny(tmp_path), "--topologies", "--server", up, "--server-url", f"http://127.0.0.1:{port}"]
    bench.main([*argv, "--server-label", "by command", "--plot", str(tmp_path / "plot.png")])
    result = json.loads((tmp_path / "serve_gpu.json").read_text())["results"]["by command"]
    assert "error" not in result, result["error"]
    for run in result["random_mm"] + result["text"]:
        assert run["completed"] == 4 and run["output_lens"] == [6] * 4 and run["label"] == "by command"
    assert result["flood"]["flooded"]["n"] == 2 and result["repeated_images"]["repeated"]["n"] == 2
    assert result["cpu_random_mm"]["cores"]["server"] > 0  # the command's own process, measured
    assert "pipeline_cost" not in result and "flooded_slowest" not in result["flood"]  # no spans to read
    assert not port_open("127.0.0.1", port)  # the server was stopped


def test_loop_lag_counts_each_process_alone() -> None:
    """Between two scrapes, each process's lateness and its ticks over 100 ms late, decode-10 not in decode-1."""
    bench = load("serve_gpu")

    def samples(ticks: float, late_s: float, within_100ms: float) -> list:
        name, labels = "epd_event_loop_lag_seconds", {"process": "decode"}
        return [
            (f"{name}_count", labels, ticks),
            (f"{name}_sum", labels, late_s),
            (f"{name}_bucket", labels | {"le": "0.1"}, within_100ms),
        ]

    before = {"decode-1": samples(10, 0.1, 10), "decode-10": samples(5, 0.0, 5)}
    after = {"decode-1": samples(20, 1.1, 18), "decode-10": samples(100, 9.0, 90), "gateway": samples(4, 0.0, 4)}
    lag = bench.loop_lag(before, after)
    assert lag["decode-1"] == {"late_s": 1.0, "ticks_over_100ms": 2}
    assert lag["decode-10"] == {"late_s": 9.0, "ticks_over_100ms": 10}
    assert lag["gateway"] == {"late_s": 0.0, "ticks_over_100ms": 0}  # first seen after: all of it counts
