"""Fixtures: a tiny real-architecture checkpoint, real NATS and Mooncake on free ports, whole clusters."""

from __future__ import annotations

import base64
import http.server
import io
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from epd.core.config import Settings, export_mooncake_env
from epd.ops.infra import MooncakeMaster, NatsServer
from epd.ops.processes import free_port, spawn, stop, wait_until
from epd.ops.up import Cluster
from epd.tools.tiny_model import build_tiny_qwen2_vl
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from PIL import Image, ImageDraw

from . import prompts

MAX_NEW = 12  # tokens per answer in the end-to-end tests


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The second family, at the same size: windowed attention in its vision tower."""
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2.5-vl", family="qwen2_5_vl")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mooncake_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeMaster]:
    master = MooncakeMaster(tmp_path_factory.mktemp("mooncake")).start()
    yield master
    master.stop()


@pytest.fixture(scope="session")
def infra_settings(tiny_model: Path, nats_server: NatsServer, mooncake_master: MooncakeMaster) -> Settings:
    settings = Settings(
        model=tiny_model,
        nats_url=nats_server.url,
        mooncake_master=mooncake_master.master_address,
        mooncake_metadata=mooncake_master.metadata_url,
        mooncake_segment_mb=32,
    )
    export_mooncake_env(settings)  # this pytest process's own Mooncake clients, as a worker's entry does
    return settings


def start_cluster(
    tiny_model: Path, workdir: Path, topology: str, counts: dict[str, int] | None = None, **settings_: object
) -> Cluster:
    """A topology with its own NATS server and Mooncake master, as `epd up` starts it. This process's own Mooncake
    clients (a test's look into the store) advertise the cluster's address."""
    cluster = Cluster.local(tiny_model, workdir, topology, counts, mooncake_segment_mb=32, **settings_)
    export_mooncake_env(cluster.settings)
    return cluster


@contextmanager
def epd_up(model: Path, workdir: Path, topology: str, *flags: str, **env: str) -> Iterator[str]:
    """The real CLI, `epd up --topology TOPOLOGY FLAGS...`, until the block ends; yields its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "epd.ops.cli", "up", "--topology", topology, "--model", str(model)]
    argv += ["--port", str(port), "--workdir", str(workdir), *flags]
    log = workdir / "up.log"
    proc = spawn(argv, log, env={**os.environ, "EPD_MOONCAKE_SEGMENT_MB": "32", **env})
    try:
        try:
            wait_until(lambda: "serving" in log.read_text(), 240, f"epd up {topology} {' '.join(flags)}", proc)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}: {log.read_text()[-2000:]}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        stop([proc])


@pytest.fixture(scope="session", params=["epd", "e-pd", "e-p-d"])
def cluster(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Each topology once per session; every module's end-to-end tests share it."""
    c = start_cluster(tiny_model, tmp_path_factory.mktemp(request.param), request.param)
    yield c
    c.stop()
    assert not c.procs  # everything stopped


def png_bytes(size: tuple[int, int] = (100, 80), color: tuple[int, int, int] = (255, 0, 0), shape: str = "") -> bytes:
    img = Image.new("RGB", size, (255, 255, 255) if shape else color)
    if shape == "circle":
        ImageDraw.Draw(img).ellipse((10, 10, size[0] - 10, size[1] - 10), fill=color)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def pictures(images: list[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(im)).convert("RGB") for im in images]


def engine_prompt(ckpt: Any, family: Any, question: str, images: list[bytes]) -> tuple[list[int], list]:
    """A user turn with `images` (encoded bytes) then `question`, as the engine's inputs (tests/prompts.py)."""
    return prompts.engine_prompt(ckpt, family, question, pictures(images))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat_body(question: str, image: bytes | list[bytes] | None = None, **extra: object) -> dict:
    """A chat request: the image (or images, in order) then the question."""
    images = [image] if isinstance(image, bytes) else image or []
    content: list[dict] = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    content.append({"type": "text", "text": question})
    return {
        "model": "tiny-qwen2-vl",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_NEW,
        "temperature": 0,
        **extra,
    }


async def post(cluster: Cluster, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=120) as client:
        return await client.post("/v1/chat/completions", json=body)


class Received:
    """Span names and service names an OTLP receiver got."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.services: set[str] = set()
        self.lock = threading.Lock()

    def add(self, req: pb.ExportTraceServiceRequest) -> None:
        with self.lock:
            for rs in req.resource_spans:
                for a in rs.resource.attributes:
                    if a.key == "service.name":
                        self.services.add(a.value.string_value)
                for ss in rs.scope_spans:
                    self.names.extend(s.name for s in ss.spans)


@pytest.fixture
def otlp_http() -> Iterator[tuple[str, Received]]:
    got = Received()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                got.add(pb.ExportTraceServiceRequest.FromString(body))
            out = pb.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", got
    server.shutdown()
    server.server_close()
