"""Observability end to end: one trace per request across processes, metrics that move, `epd status`."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from epd.ops.status_view import gather_status
from epd.ops.trace_view import load_spans, spans_for_request
from epd.ops.up import Cluster
from prometheus_client.parser import text_string_to_metric_families

from .conftest import chat_body, png_bytes, post

pytestmark = pytest.mark.e2e

GATEWAY_SPANS = {"POST /v1/chat/completions", "route", "reply", "ttft"}  # (ttft: bench/pipeline_cost.py)
# what a request with a new image leaves in each process, by topology
EXPECTED = {
    "epd": {
        "epd-gateway": GATEWAY_SPANS,
        "epd-epd": {
            "queue prefill",
            "prefill epd.v1.prefill",
            "ec.load",
            "images.get",
            "encode",
            "ec.save",
            "prefill.forward",
            "reply.first",
            "decode",
        },
    },
    "e-pd": {
        "epd-gateway": GATEWAY_SPANS,
        "epd-encode": {"queue encode", "encode epd.v1.encode", "images.get", "encode", "ec.save", "publish prefill"},
        "epd-pd": {"queue prefill", "prefill epd.v1.prefill", "ec.load", "prefill.forward", "reply.first", "decode"},
    },
    "e-p-d": {
        "epd-gateway": GATEWAY_SPANS,
        "epd-encode": {"queue encode", "encode epd.v1.encode", "images.get", "encode", "ec.save", "publish prefill"},
        "epd-prefill": {
            "queue prefill",
            "prefill epd.v1.prefill",
            "kv.reserve",
            "ec.load",
            "prefill.forward",
            "reply.first",
            "kv.send",
            "publish decode",
        },
        "epd-decode": {"queue decode", "decode epd.v1.decode", "kv.recv", "decode"},
    },
}


async def complete_trace(cluster: Cluster, request_id: str, expected: dict[str, set[str]]) -> list[dict]:
    """The request's spans, once every expected span is on disk and they form one tree (bounded wait)."""
    spans: list[dict] = []
    for _ in range(50):  # processes flush every 200 ms; a parent is written after its children
        spans = spans_for_request(load_spans(Path(cluster.settings.trace_dir)), request_id)
        have = {(s["service"], s["name"]) for s in spans}
        ids = {s["span_id"] for s in spans}
        complete = all((svc, name) in have for svc, names in expected.items() for name in names)
        if complete and sum(s["parent_id"] not in ids for s in spans) == 1:
            break
        await asyncio.sleep(0.2)
    return spans


async def test_a_request_is_one_trace_across_every_process(cluster: Cluster) -> None:
    image = png_bytes(size=(70, 50), color=(10, 120, 240), shape="circle")
    r = await post(cluster, chat_body("What shape is it?", image))
    assert r.status_code == 200, r.text
    out = r.json()
    expected = EXPECTED[cluster.settings.topology]
    spans = await complete_trace(cluster, out["id"], expected)
    by_service: dict[str, set[str]] = {}
    for s in spans:
        by_service.setdefault(s["service"], set()).add(s["name"])
    assert set(by_service) == set(expected)
    for service, names in expected.items():
        assert names <= by_service[service], (service, names - by_service[service])
    assert len({s["trace_id"] for s in spans}) == 1
    ids = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["parent_id"] is None]
    orphans = [s for s in spans if s["parent_id"] is not None and s["parent_id"] not in ids]
    assert not orphans, orphans
    assert [s["name"] for s in roots] == ["POST /v1/chat/completions"]
    # every worker process's spans hang off a span of another process (context crossed NATS)
    for service in set(expected) - {"epd-gateway"}:
        assert any(
            s["parent_id"] in ids and ids[s["parent_id"]]["service"] != service
            for s in spans
            if s["service"] == service
        ), service
    # GenAI attributes agree with what the client was told
    chat = next(s for s in spans if s["name"] == "POST /v1/chat/completions")["attributes"]
    assert chat["gen_ai.request.model"] == "tiny-qwen2-vl"
    assert chat["gen_ai.usage.input_tokens"] == out["usage"]["prompt_tokens"]
    assert chat["gen_ai.usage.output_tokens"] == out["usage"]["completion_tokens"]
    assert chat["http.response.status_code"] == 200 and chat["epd.ttft_ms"] > 0
    decode = next(s for s in spans if s["name"] == "decode")["attributes"]
    assert decode["gen_ai.usage.output_tokens"] == out["usage"]["completion_tokens"]
    # queue spans measure publish-to-fetch inside their parent's lifetime
    for q in (s for s in spans if s["name"].startswith("queue ")):
        assert q["end_ns"] >= q["start_ns"] >= ids[q["parent_id"]]["start_ns"] - 5_000_000  # clocks: one host

    # `epd trace ID` shows the waterfall, and --html writes a timeline holding every span
    html = Path(cluster.workdir) / "timeline.html"
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "epd.ops.cli",
            "trace",
            out["id"],
            "--dir",
            cluster.settings.trace_dir,
            "--html",
            str(html),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    for service, names in expected.items():
        for name in names:
            assert any(line.strip().startswith(name) and f"{service}[" in line for line in shown.stdout.splitlines()), (
                name,
                shown.stdout,
            )
    page = html.read_text()
    assert all(name in page for names in expected.values() for name in names)


async def test_a_cached_image_is_not_encoded_again(cluster: Cluster) -> None:
    image = png_bytes(size=(66, 90), color=(240, 200, 10), shape="circle")
    first = await post(cluster, chat_body("What color is the shape?", image))
    again = await post(cluster, chat_body("What color is the shape?", image))
    assert first.status_code == again.status_code == 200
    expected = {
        service: names - {"encode", "ec.save"}
        for service, names in EXPECTED[cluster.settings.topology].items()
        if service != "epd-encode"
    }
    spans = await complete_trace(cluster, again.json()["id"], expected)
    names = {s["name"] for s in spans}
    assert "encode" not in names and "ec.save" not in names
    assert "epd-encode" not in {s["service"] for s in spans}  # the encoder process never saw it
    assert [s["attributes"]["epd.hits"] for s in spans if s["name"] == "ec.load"] == [1]
    route = next(s for s in spans if s["name"] == "route")["attributes"]
    assert route["epd.route"] == "prefill"
    if cluster.settings.topology != "epd":  # the gateway asked the shared cache (the aggregated worker has its own)
        assert route["epd.ec_hits"] == 1


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(url, timeout=10).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples: list, name: str, **labels: str) -> float:
    return sum(v for n, lb, v in samples if n == name and all(lb.get(k) == w for k, w in labels.items()))


async def all_metrics(cluster: Cluster) -> tuple[list, list]:
    """(gateway samples, every live worker's samples together)."""
    workers, _ = await gather_status(cluster.settings.nats_url)
    assert workers and all(w.metrics_url for w in workers)
    worker_samples = [s for w in workers for s in scrape(w.metrics_url)]
    return scrape(cluster.base_url + "/metrics"), worker_samples


async def test_metrics_move_with_known_traffic(cluster: Cluster) -> None:
    topology = cluster.settings.topology
    gw0, wk0 = await all_metrics(cluster)
    image = png_bytes(size=(81, 57), color=(30, 160, 60), shape="circle")
    answers = [
        await post(cluster, chat_body("What color is the shape?", image)),  # new image: encoded
        await post(cluster, chat_body("What color is the shape?", image)),  # cached
        await post(cluster, chat_body("Say something.")),  # text only
    ]
    assert all(a.status_code == 200 for a in answers)
    usage = [a.json()["usage"] for a in answers]
    bad = await post(cluster, {**chat_body("hi"), "model": "no-such-model"})
    assert bad.status_code == 404
    await asyncio.sleep(0.2)
    gw1, wk1 = await all_metrics(cluster)

    def gw(name: str, **lb: str) -> float:
        return total(gw1, name, **lb) - total(gw0, name, **lb)

    def wk(name: str, **lb: str) -> float:
        return total(wk1, name, **lb) - total(wk0, name, **lb)

    multi_token = sum(u["completion_tokens"] > 1 for u in usage)
    assert gw("epd_requests_total", status="200") == 3
    assert gw("epd_requests_total", status="404") == 1
    assert gw("epd_errors_total", stage="gateway", type="404") == 1
    assert gw("epd_time_to_first_token_seconds_count") == 3
    assert gw("epd_e2e_request_latency_seconds_count") == 3
    assert gw("epd_time_per_output_token_seconds_count") == multi_token
    assert gw("epd_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert gw("epd_generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert wk("epd_queue_wait_seconds_count", stage="prefill") == 3
    assert wk("epd_stage_duration_seconds_count", stage="prefill") == 3
    assert wk("epd_batch_size_count", stage="prefill") == 3
    assert total(wk1, "epd_in_flight_jobs") == 0 and total(wk1, "epd_kv_cache_tokens") == 0
    depths = {lb["stage"]: v for n, lb, v in wk1 if n == "epd_queue_depth"}  # from the heartbeats
    assert "prefill" in depths and set(depths.values()) == {0.0}  # idle now: nothing waits
    if topology == "epd":  # the aggregated worker misses, encodes inline, then hits
        assert wk("epd_encoder_cache_lookups_total", where="prefill", result="miss") == 1
        assert wk("epd_encoder_cache_lookups_total", where="prefill", result="hit") == 2
    else:
        assert gw("epd_encoder_cache_lookups_total", where="router", result="miss") == 1
        assert gw("epd_encoder_cache_lookups_total", where="router", result="hit") == 1
        assert wk("epd_encoder_cache_lookups_total", where="prefill", result="hit") == 2
        assert wk("epd_queue_wait_seconds_count", stage="encode") == 1
        assert wk("epd_batch_size_sum", stage="encode") == 1
        assert wk("epd_connector_bytes_total", connector="ec", direction="save") > 0
        assert wk("epd_connector_bytes_total", connector="ec", direction="load") == 2 * wk(
            "epd_connector_bytes_total", connector="ec", direction="save"
        )
    if topology == "e-p-d":
        assert wk("epd_queue_wait_seconds_count", stage="decode") == multi_token
        kv_sent = wk("epd_connector_bytes_total", connector="kv", direction="save")
        assert kv_sent > 0 and kv_sent == wk("epd_connector_bytes_total", connector="kv", direction="load")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epd.ops.cli", *args], capture_output=True, text=True, timeout=60)


async def test_trace_lists_the_last_and_the_slowest_requests(cluster: Cluster) -> None:
    ids = []
    for n in (1, 12, 2):  # different lengths; the trace files decide which was slowest
        r = await post(cluster, {**chat_body("Count."), "max_tokens": n})
        assert r.status_code == 200
        ids.append(r.json()["id"])
    for rid in ids:
        await complete_trace(cluster, rid, {"epd-gateway": GATEWAY_SPANS})
    trace_dir = cluster.settings.trace_dir
    count = -1
    for _ in range(50):  # until every process has flushed (every 200 ms): the CLI and the test read the same
        await asyncio.sleep(0.5)
        if count == (count := len(load_spans(Path(trace_dir)))):
            break
    last = run_cli("trace", "--last", "2", "--dir", trace_dir)
    assert last.returncode == 0, last.stderr
    assert [line.split()[0] for line in last.stdout.splitlines()] == ids[1:]
    for _ in range(10):  # the CLI and the test must rank the same spans: retry if one was flushed meanwhile
        before = len(load_spans(Path(trace_dir)))
        slow = run_cli("trace", "--slowest", "3", "--dir", trace_dir)
        spans = load_spans(Path(trace_dir))
        if len(spans) == before:
            break
    listed = [line.split()[0] for line in slow.stdout.splitlines()]

    # each trace's length, under the request id of its root span (the gateway's, or a NATS-native client's)
    traces: dict[str, list[dict]] = {}
    for s in spans:
        traces.setdefault(s["trace_id"], []).append(s)
    length = {
        root["attributes"]["epd.request_id"]: max(s["end_ns"] for s in group) - min(s["start_ns"] for s in group)
        for group in traces.values()
        for root in group
        if root["parent_id"] is None and root["attributes"].get("epd.request_id")
    }
    assert len(listed) == 3 and set(listed) <= set(length)
    assert [length[r] for r in listed] == sorted(length.values(), reverse=True)[:3]


async def test_status_shows_the_pool_and_a_dead_worker_leaves_it(cluster: Cluster) -> None:
    from epd.core.config import TOPOLOGY_ROLES

    shown = run_cli("status", "--json", "--nats-url", cluster.settings.nats_url)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    roles = sorted(w["role"] for w in status["workers"])
    assert roles == sorted(TOPOLOGY_ROLES[cluster.settings.topology])
    assert all(w["served"] > 0 for w in status["workers"])  # earlier tests sent them traffic
    assert set(status["queues"]) >= {"prefill"}
    table = run_cli("status", "--nats-url", cluster.settings.nats_url)
    assert all(role in table.stdout for role in roles)
    if cluster.settings.topology != "epd":
        return  # killing a worker is shown once, on the topology without shared Mooncake segments
    extra = cluster.add_worker("epd", 99)
    try:
        for _ in range(300):  # it loads the model, then beats
            workers, _ = await gather_status(cluster.settings.nats_url)
            mine = [w for w in workers if w.pid == extra.pid]
            if mine:
                break
            await asyncio.sleep(0.2)
        assert mine, "the added worker never joined the pool"
        os.kill(extra.pid, signal.SIGKILL)  # no goodbye: only the TTL can remove it
        killed_at = time.monotonic()
        while any(w.pid == extra.pid for w in (await gather_status(cluster.settings.nats_url))[0]):
            assert time.monotonic() - killed_at < 10, "a dead worker stayed in the pool"
            await asyncio.sleep(0.25)
        assert time.monotonic() - killed_at >= 1.0  # it left because it stopped beating, not at once
    finally:
        extra.wait(10)
        cluster.procs.pop("epd-99", None)


async def test_concurrent_requests_for_one_new_image_encode_it_once(cluster: Cluster, tiny_model: Path) -> None:
    from .oracle import reference

    image = png_bytes(size=(72, 72), color=(150, 40, 220), shape="circle")
    _, expected = reference(tiny_model, "What color is the shape?", image, 12)
    _, before = await all_metrics(cluster)
    answers = await asyncio.gather(*(post(cluster, chat_body("What color is the shape?", image)) for _ in range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == [expected] * 4
    ids = [a.json()["id"] for a in answers]
    for rid in ids:
        await complete_trace(cluster, rid, {"epd-gateway": GATEWAY_SPANS})
    await asyncio.sleep(0.6)  # every process has flushed (200 ms) since the last answer

    def encodes() -> int:
        spans = load_spans(Path(cluster.settings.trace_dir))
        return sum(s["name"] == "encode" for rid in ids for s in spans_for_request(spans, rid))

    assert encodes() == 1  # one forward for the image; the other requests waited for its embedding
    if cluster.settings.topology != "epd":  # and only one job ever reached the encoders
        _, after = await all_metrics(cluster)
        jobs = total(after, "epd_queue_wait_seconds_count", stage="encode")
        assert jobs - total(before, "epd_queue_wait_seconds_count", stage="encode") == 1
