"""Fixtures: a tiny real-architecture checkpoint, real NATS and Mooncake on free ports, whole clusters."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from epd.ops.config import Settings
from epd.ops.infra import MooncakeMaster, NatsServer
from epd.ops.processes import free_port
from epd.ops.tiny_model import build_tiny_qwen2_vl
from epd.ops.up import Cluster
from PIL import Image, ImageDraw


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl")


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
    return Settings(
        model=tiny_model,
        nats_url=nats_server.url,
        mooncake_master=mooncake_master.master_address,
        mooncake_metadata=mooncake_master.metadata_url,
        mooncake_segment_mb=32,
    )


def start_cluster(tiny_model: Path, workdir: Path, topology: str) -> Cluster:
    """A topology with its own NATS server and Mooncake master, as `epd up` starts it."""
    settings = Settings(
        model=tiny_model,
        topology=topology,
        port=free_port(),
        trace_dir=str(workdir / "traces"),
        mooncake_segment_mb=32,
        nats_url="",
        mooncake_master="",
        mooncake_metadata="",
    )
    return Cluster(settings, workdir).start(gateway_timeout_s=180)


def png_bytes(size: tuple[int, int] = (100, 80), color: tuple[int, int, int] = (255, 0, 0), shape: str = "") -> bytes:
    img = Image.new("RGB", size, (255, 255, 255) if shape else color)
    if shape == "circle":
        ImageDraw.Draw(img).ellipse((10, 10, size[0] - 10, size[1] - 10), fill=color)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()
