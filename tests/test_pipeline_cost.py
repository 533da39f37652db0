"""bench/pipeline_cost.py: the TTFT window split into the engine and the pipeline's hops, from real spans.

A hand-built trace checks the rules (each instant to one part, the reply leg first, nothing after the first token);
a real e-p-d cluster's spans check that the spans the split reads are there and that its parts add up. No speed
is asserted.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import data_url, png_bytes, start_cluster

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench():  # noqa: ANN201 - the script is no package
    spec = importlib.util.spec_from_file_location("pipeline_cost", BENCH / "pipeline_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pipeline_cost"] = module
    spec.loader.exec_module(module)
    return module


pc = load_bench()
MS = 1_000_000  # ns


def span(
    name: str, start_ms: float, end_ms: float, parent: str | None, service: str, pid: int, **attrs: object
) -> dict:
    return {
        "trace_id": "t1",
        "span_id": name,
        "parent_id": parent,
        "name": name,
        "service": service,
        "pid": pid,
        "start_ns": int(start_ms * MS),
        "end_ns": int(end_ms * MS),
        "attributes": attrs,
    }


@pytest.mark.unit
def test_each_instant_of_the_window_goes_to_one_part() -> None:
    gw, wk = ("epd-gateway", 1), ("epd-prefill", 2)
    spans = [
        span("POST /v1/chat/completions", -3, 130, None, *gw, **{"epd.ttft_ms": 100.0}),
        span("ttft", 0, 100, "POST /v1/chat/completions", *gw, **{"epd.request_id": "r1"}),
        span("reply", 21, 125, "POST /v1/chat/completions", *gw),  # the whole stream: not a part
        span("route", 5, 21, "POST /v1/chat/completions", *gw, **{"epd.images": 0}),
        span("images.put", 8, 12, "route", *gw),
        span("publish prefill", 18, 21, "route", *gw),
        span("queue prefill", 20, 25, "route", *wk, **{"epd.stage": "prefill"}),
        span("prefill epd.v1.prefill", 26, 97, "route", *wk, **{"epd.stage": "prefill"}),
        span("kv.reserve", 27, 29, "prefill epd.v1.prefill", *wk),
        span("prefill.forward", 30, 50, "prefill epd.v1.prefill", *wk),
        span("reply.first", 80, 81, "prefill epd.v1.prefill", *wk),
        span("kv.send", 85, 95, "prefill epd.v1.prefill", *wk),  # after the first token left: off the path
        span("decode", 110, 120, "prefill epd.v1.prefill", "epd-decode", 3),  # after the window
    ]
    (row,) = pc.breakdown(spans)
    assert row["request_id"] == "r1" and row["before_ms"] == 3 and row["images"] == 0
    assert row["ttft_ms"] == 100 and row["engine_ms"] == 20 and row["prefill_ms"] == 20 and row["encode_ms"] == 0
    # nats: images.put 4, publish 18..21 and the queue to 25 (7), the fetched job 25..26 (1), kv.reserve (a NATS
    # request to a decoder) 27..29 (2), reply leg 80..100 (20); gateway: route's 16 less images.put and its part of
    # the publish; worker: 26..80 less kv.reserve and the forward; other: 0..5, before route; mooncake: kv.send
    # came after the first token left
    assert row["hops_ms"] == {"gateway": 9, "nats": 34, "mooncake": 0, "worker": 32, "other": 5}
    assert row["pipeline_ms"] == 80
    # where two spans of one part overlap, the one that started last takes it: the queue, over the publish's ack
    assert row["detail_ms"]["nats"] == {
        "images.put": 4,
        "publish prefill": 2,
        "queue prefill": 5,
        "fetched prefill": 1,
        "kv.reserve": 2,
        "reply leg": 20,
    }
    assert row["detail_ms"]["worker"] == {"prefill epd.v1.prefill": 32}
    assert row["detail_ms"]["other"] == {"no span": 5}


@pytest.mark.unit
def test_summary_takes_median_and_p90() -> None:
    rows = [
        {
            "ttft_ms": float(v),
            "engine_ms": 1.0,
            "decode_ms": 0.0,
            "encode_ms": 0.0,
            "prefill_ms": 1.0,
            "pipeline_ms": v - 1.0,
            "before_ms": 0.1,
            "hops_ms": dict.fromkeys(pc.HOPS, v / 10),
            "detail_ms": {h: {"a span": v / 10} for h in pc.HOPS},
        }
        for v in range(1, 11)
    ]
    out = pc.summarize(rows)
    assert out["n"] == 10 and out["ttft_ms"] == {"p50": 5.5, "p90": 9.0}
    assert out["hops_ms"]["nats"] == {"p50": 0.55, "p90": 0.9}
    assert out["detail_p50_ms"]["nats"] == {"a span": 0.55}
    assert pc.summarize([]) == {"n": 0}


@pytest.mark.e2e
async def test_a_real_clusters_spans_split_exactly(tiny_model: Path, tmp_path: Path) -> None:
    cluster = start_cluster(tiny_model, tmp_path, "e-p-d")
    try:
        trace_dir, name = Path(cluster.settings.trace_dir), cluster.settings.model_name
        colors = [(40 * i, 90, 200 - 30 * i) for i in range(5)]  # a new image each: every request encodes

        def image(i: int) -> str:
            return data_url(png_bytes((96, 64), colors[i + 2], shape="circle"))

        images = await pc.measure(cluster.base_url, name, trace_dir, 3, image, warmup=1)
        texts = await pc.measure(cluster.base_url, name, trace_dir, 3, None, warmup=0)
    finally:
        cluster.stop()
    assert images["incomplete"] == 0 and texts["incomplete"] == 0
    assert images["n"] == 3 and texts["n"] == 3
    for row in images["rows"] + texts["rows"]:
        hops = row["hops_ms"]
        assert sum(hops.values()) == pytest.approx(row["ttft_ms"] - row["engine_ms"], abs=1e-6)
        assert row["pipeline_ms"] == pytest.approx(row["ttft_ms"] - row["engine_ms"], abs=1e-9)
        for hop, labels in row["detail_ms"].items():
            assert sum(labels.values()) == pytest.approx(hops[hop], abs=1e-6)
        assert all(v >= 0 for v in hops.values()), hops
        assert 0 < row["prefill_ms"] <= row["engine_ms"] < row["ttft_ms"]
        # the window's span and the gateway's own TTFT are the same two instants on two clocks
        assert row["ttft_ms"] == pytest.approx(row["gateway_ttft_ms"], abs=0.05)
        assert row["ttft_ms"] < row["client_ttft_ms"]  # the gateway's TTFT lies inside the client's
        assert hops["nats"] > 0 and hops["gateway"] > 0  # queues, route
    for row in images["rows"]:
        assert row["images"] == 1 and row["encode_ms"] > 0 and row["decode_ms"] > 0  # (its bytes, PIL)
        assert row["detail_ms"]["mooncake"]["ec.save"] > 0 and row["detail_ms"]["mooncake"]["ec.load"] > 0
        assert row["engine_ms"] == pytest.approx(row["decode_ms"] + row["encode_ms"] + row["prefill_ms"], abs=1e-6)
    for row in texts["rows"]:
        assert row["images"] == 0 and row["encode_ms"] == 0 and row["engine_ms"] == row["prefill_ms"]
