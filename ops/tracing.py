"""OpenTelemetry setup, W3C context in NATS headers, and a JSON-lines span file.

One trace per request: the gateway starts it; every NATS message carries
`traceparent` in its headers; each stage continues it. `epd up` writes spans to
`<trace_dir>/<service>-<pid>.jsonl`, which `epd trace` reads. The standard
`OTEL_*` variables add an OTLP exporter.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from opentelemetry import context, trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

TRACER_NAME = "epd"


class JsonlSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line; one file per process, no locking across them."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_record(s), separators=(",", ":")) + "\n" for s in spans]
        with self._lock:
            self._file.writelines(lines)
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
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [f"{lk.context.trace_id:032x}:{lk.context.span_id:016x}" for lk in span.links],
    }


def setup_tracing(service: str, trace_dir: str = "") -> TracerProvider:
    """Install the global tracer provider for this process."""
    provider = TracerProvider(resource=Resource.create({"service.name": service, "process.pid": os.getpid()}))
    if trace_dir:
        path = Path(trace_dir) / f"{service}-{os.getpid()}.jsonl"
        provider.add_span_processor(BatchSpanProcessor(JsonlSpanExporter(path), schedule_delay_millis=200))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    trace.set_tracer_provider(provider)
    return provider


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
