"""`docker compose up` for real: the repository's docker-compose.yml on a Docker engine, with the override in
tests/compose/ for what a machine without a container registry lacks (NATS and Prometheus images built from
Debian's packages, an OTLP receiver in Jaeger's place).

The images are built, the stack comes up healthy, and through it: the README's red-circle questions are
answered on 127.0.0.1:8000; a second encoder added with `--scale encoder=2` while requests flow takes jobs;
Prometheus scrapes the gateway and every worker container; each request is one trace across the services; and
`docker compose down` leaves no container, network, volume or container process behind.

Cost: cold (no engine state) about 4 min of building and 1.5 GB; warm (images cached) about 1 min.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import chat_body, png_bytes
from .docker_stack import Project, build_args, container_ip, docker_engine, ensure_base_image

# the first test's timeout covers the module's set-up: a cold build takes several minutes
pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "epd-demo-qwen2-vl"
GATEWAY = "http://127.0.0.1:8000"
PROMETHEUS = "http://127.0.0.1:9090"
SPANS = "http://127.0.0.1:16686/spans"  # the OTLP receiver's dump, on Jaeger's published UI port
WORKERS = ("encoder", "prefill", "decode")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = Project("epd-compose-test")
    with docker_engine(tmp_path_factory.mktemp("docker")):
        ensure_base_image()
        with build_args() as args:  # one epd service builds epd:cpu for all of them
            project("build", *args, "gateway", "nats", "prometheus", timeout_s=1800)
        try:
            project("up", "-d", "--wait", "--wait-timeout", "300", "--no-build", "--pull", "never", timeout_s=400)
            yield project
        finally:
            project("down", "--volumes", "--remove-orphans", timeout_s=120, check=False)


def chat(question: str, image: bytes | list[bytes] | None = None) -> dict:
    return chat_body(question, image, model=SHIPPED.name, max_tokens=8)


def ask(body: dict) -> dict:
    r = httpx.post(GATEWAY + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def readme_picture() -> bytes:
    """The README's red circle, made by the README's own command."""
    section = (ROOT / "README.md").read_text().split("Ask it about a picture", 1)[1]
    snippet = re.search(r'IMG=\$\(\.venv/bin/python -c "(.*?)"\)', section, re.S).group(1)
    made = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True)
    return base64.b64decode(made.stdout)


def stage_jobs(project: Project, service: str, index: int, stage: str) -> float:
    """Jobs one replica of a worker service finished: its own /metrics, read inside its container."""
    text = project.exec_python(
        service,
        index,
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9400/metrics').read().decode())",
    )
    m = re.search(rf'^epd_stage_duration_seconds_count\{{stage="{stage}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_the_readme_red_circle_is_answered_on_the_published_port(stack: Project) -> None:
    image = readme_picture()
    for question, expected in (("What shape is it?", "circle"), ("What color is the shape?", "red")):
        assert ask(chat(question, image))["choices"][0]["message"]["content"].strip() == expected


def test_a_second_encoder_added_while_serving_takes_jobs(stack: Project) -> None:
    first = stack.containers("encoder")
    assert len(first) == 1
    stop = False

    def serve() -> list[int]:  # requests keep coming while compose adds the replica
        codes = []
        while not stop:
            body = chat("What shape is it?", png_bytes(size=(64 + len(codes), 64), color=(200, 200, 30)))
            codes.append(httpx.post(GATEWAY + "/v1/chat/completions", json=body, timeout=120).status_code)
        return codes

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        during = pool.submit(serve)
        stack("up", "-d", "--wait", "--no-build", "--pull", "never", "--no-recreate", "--scale", "encoder=2")
        stop = True
        assert set(during.result()) == {200}
    assert set(stack.containers("encoder")) > set(first)  # the first one kept running: added, not replaced
    before = stage_jobs(stack, "encoder", 2, "encode")
    # 8 requests at once, each with two pictures no one has sent: 16 encode jobs for the two encoders to pull
    bodies = [
        chat("What color is the shape?", [png_bytes(size=(80 + i, 60 + k), color=(30, 90 * k, 200)) for k in (1, 2)])
        for i in range(8)
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, bodies))
    assert stage_jobs(stack, "encoder", 2, "encode") > before


def test_prometheus_scrapes_the_gateway_and_every_worker(stack: Project) -> None:
    workers = {f"{container_ip(c)}:9400" for c in stack.containers(*WORKERS)}
    assert len(workers) >= len(WORKERS)
    deadline = time.monotonic() + 90  # scrapes every 5 s; DNS discovery of a new replica every 30 s
    while True:
        targets = httpx.get(PROMETHEUS + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        up = {(t["labels"]["job"], t["labels"]["instance"]) for t in targets if t["health"] == "up"}
        want = {("gateway", "gateway:8000"), ("mooncake-master", "mooncake-master:9003")}
        want |= {("workers", w) for w in workers}
        if want <= up or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert want <= up, (want - up, targets)
    q = httpx.get(PROMETHEUS + "/api/v1/query", params={"query": "epd_requests_total"}, timeout=10).json()
    assert sum(float(r["value"][1]) for r in q["data"]["result"]) > 0  # the gateway's series, scraped


def test_each_request_is_one_trace_across_the_services(stack: Project) -> None:
    fresh = png_bytes(size=(77, 55), color=(10, 200, 10), shape="triangle")
    asked = {
        ask(chat("What shape is it?", fresh))["id"]: {"epd-gateway", "epd-encode", "epd-prefill", "epd-decode"},
        ask(chat("What color is the shape?", fresh))["id"]: {"epd-gateway", "epd-prefill", "epd-decode"},
        ask(chat("Hello!"))["id"]: {"epd-gateway", "epd-prefill", "epd-decode"},
    }
    deadline = time.monotonic() + 60  # the exporters send in batches every 5 s
    while True:
        spans = httpx.get(SPANS, timeout=10).json()
        traces = {rid: {s["trace_id"] for s in spans if s["attributes"].get("epd.request_id") == rid} for rid in asked}
        services = {rid: {s["service"] for s in spans if s["trace_id"] in ids} for rid, ids in traces.items()}
        if all(services[r] >= want for r, want in asked.items()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for rid, want in asked.items():
        assert len(traces[rid]) == 1, (rid, traces[rid])  # one trace, however many processes it crossed
        assert services[rid] >= want, (rid, services[rid])


def test_down_leaves_no_container_network_or_process(stack: Project) -> None:
    containers = stack.labelled("container")
    assert containers and stack.labelled("network")
    full_ids = json.loads(subprocess.run(["docker", "inspect", *containers], capture_output=True, check=True).stdout)
    stack("down", "--volumes", "--remove-orphans", timeout_s=120)
    assert stack.labelled("container") == []
    assert stack.labelled("network") == []
    assert stack.labelled("volume") == []
    # each container ran under a containerd shim whose command line names the container's id
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    left = [c["Id"] for c in full_ids if c["Id"] in ps]
    assert left == [], left
