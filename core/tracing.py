"""OpenTelemetry setup, W3C context in NATS headers, and a JSON-lines span file.

One trace per request: the gateway starts it; every NATS message carries
`traceparent` in its headers; each stage continues it. `epd up` writes spans to
`<trace_dir>/<service>-<pid>.jsonl`, which `epd trace` reads. The standard
`OTEL_EXPORTER_OTLP_*` variables add an OTLP exporter (HTTP or gRPC). `EPD_TRACING=off`
(or the standard `OTEL_SDK_DISABLED=true`) turns tracing off; `EPD_TRACE_SAMPLE_RATIO`
samples that share of requests at the gateway, and every later stage follows its decision.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import msgspec
import xxhash
from epd.core.config import Settings
from opentelemetry import context, trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

TRACER_NAME = "epd"
_json = msgspec.json.Encoder()


class JsonlSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line; one file per process, no locking across them."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 - closed in shutdown
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = b"".join(_json.encode(span_record(s)) + b"\n" for s in spans)
        with self._lock:
            self._file.write(data)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def span_record(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    res = span.resource.attributes
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "service": res.get("service.name", ""),
        "pid": res.get("process.pid", 0),
        "host": res.get("host.ip", ""),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [f"{lk.context.trace_id:032x}:{lk.context.span_id:016x}" for lk in span.links],
    }


def setup_tracing(service: str, settings: Settings) -> TracerProvider | None:
    """Install the global tracer provider for this process; None when tracing is off."""
    if not settings.tracing or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    provider = make_provider(service, settings.trace_sample_ratio, settings.reachable_host)
    if settings.trace_dir:
        path = Path(settings.trace_dir) / f"{service}-{os.getpid()}.jsonl"
        provider.add_span_processor(BatchSpanProcessor(JsonlSpanExporter(path), schedule_delay_millis=200))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    trace.set_tracer_provider(provider)
    return provider


def make_provider(service: str, sample_ratio: float = 1.0, host: str = "") -> TracerProvider:
    """A provider with epd's sampler and span ids, and no exporter yet. `host`: the address this process is
    reached at (`host.ip`), so a trace shows which machine each stage ran on."""
    attributes = {"service.name": service, "process.pid": os.getpid()} | ({"host.ip": host} if host else {})
    return TracerProvider(
        resource=Resource.create(attributes),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        id_generator=_IdGenerator(),
    )


_fixed_span_id: ContextVar[int | None] = ContextVar("epd_fixed_span_id", default=None)


class _IdGenerator(RandomIdGenerator):
    """Random ids, except for a span started under `fixed_span_id`."""

    def generate_span_id(self) -> int:
        fixed = _fixed_span_id.get()
        if fixed is not None:
            _fixed_span_id.set(None)  # only the next span
            return fixed
        return super().generate_span_id()


def attempt_span_id(trace_id: int, key: str) -> int:
    """A span id every process derives alike from a trace and a key, e.g. a job's first delivery.

    A redelivered job's span links to its first attempt's span without anyone storing its id.
    """
    return xxhash.xxh64_intdigest(f"{trace_id:032x}/{key}".encode()) or 1


@contextmanager
def fixed_span_id(span_id: int) -> Iterator[None]:
    """The next span started in this block gets `span_id`."""
    token = _fixed_span_id.set(span_id)
    try:
        yield
    finally:
        _fixed_span_id.reset(token)


def _otlp_exporter() -> SpanExporter:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """The current span's W3C context, added to NATS headers."""
    headers = dict(headers or {})
    inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> context.Context:
    return extract(dict(headers or {}))
