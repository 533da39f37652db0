"""Span export as an operator configures it: OTLP over HTTP and gRPC from the standard variables,
the JSON-lines file, sampling, and off. Each case runs in a fresh process (a provider is global)."""

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from epd.ops.processes import free_port
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc

from .conftest import Received

pytestmark = pytest.mark.integration

SPANS = 200
EMIT = f"""
import sys
from epd.core.config import Settings
from epd.core.tracing import setup_tracing, tracer
provider = setup_tracing("epd-test", Settings(trace_dir=sys.argv[1]))
for i in range({SPANS}):
    with tracer().start_as_current_span(f"span-{{i}}"):
        pass
if provider is not None:
    provider.shutdown()
"""


@pytest.fixture
def otlp_grpc() -> Iterator[tuple[str, Received]]:
    got = Received()

    class Service(pb_grpc.TraceServiceServicer):
        def Export(self, request: pb.ExportTraceServiceRequest, context: object) -> pb.ExportTraceServiceResponse:  # noqa: N802
            got.add(request)
            return pb.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"http://127.0.0.1:{port}", got
    server.stop(grace=None)


def emit(trace_dir: Path, **env: str) -> list[str]:
    """Run a process that makes SPANS spans; returns the lines of its JSON-lines span files."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "EPD_"))}
    done = subprocess.run(
        [sys.executable, "-c", EMIT, str(trace_dir)], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [line for f in trace_dir.glob("*.jsonl") for line in f.read_text().splitlines() if line]


def test_otlp_over_http(tmp_path: Path, otlp_http: tuple[str, Received]) -> None:
    url, got = otlp_http
    lines = emit(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=url, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert sorted(got.names) == sorted(f"span-{i}" for i in range(SPANS))
    assert got.services == {"epd-test"}
    assert len(lines) == SPANS  # the file keeps working beside OTLP


def test_otlp_over_grpc(tmp_path: Path, otlp_grpc: tuple[str, Received]) -> None:
    url, got = otlp_grpc
    emit(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=url, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert sorted(got.names) == sorted(f"span-{i}" for i in range(SPANS))
    assert got.services == {"epd-test"}


def test_tracing_off(tmp_path: Path, otlp_http: tuple[str, Received]) -> None:
    url, got = otlp_http
    assert emit(tmp_path / "a", EPD_TRACING="off", OTEL_EXPORTER_OTLP_ENDPOINT=url) == []
    assert emit(tmp_path / "b", OTEL_SDK_DISABLED="true", OTEL_EXPORTER_OTLP_ENDPOINT=url) == []
    assert got.names == []


def test_sampling_ratio(tmp_path: Path) -> None:
    assert emit(tmp_path / "none", EPD_TRACE_SAMPLE_RATIO="0") == []
    half = len(emit(tmp_path / "half", EPD_TRACE_SAMPLE_RATIO="0.5"))
    assert 50 < half < 150  # binomial(200, 0.5): outside this range has odds below 1e-12
    assert len(emit(tmp_path / "all", EPD_TRACE_SAMPLE_RATIO="1")) == SPANS
