"""An OTLP/HTTP trace receiver for the compose test, in Jaeger's place (no Jaeger image can be built here).

It takes `POST /v1/traces` (http/protobuf, what epd's exporters send) on Jaeger's OTLP port 4318 and keeps each
span as a small dict; `GET /spans` on either port returns them as a JSON list. It runs in the epd image, whose
OpenTelemetry packages bring the protobuf classes. Memory grows with the spans kept: fine for a test's minutes.
"""

from __future__ import annotations

import http.server
import json
import threading

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

OTLP_PORT = 4318
QUERY_PORT = 16686  # Jaeger UI's port, which the compose file publishes on the host


def _value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


class Store:
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def add(self, req: pb.ExportTraceServiceRequest) -> None:
        got = []
        for rs in req.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        {
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_id": s.parent_span_id.hex() or None,
                            "name": s.name,
                            "service": resource.get("service.name"),
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                        }
                    )
        with self.lock:
            self.spans.extend(got)

    def dump(self) -> bytes:
        with self.lock:
            return json.dumps(self.spans).encode()


def handler(store: Store) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            store.add(pb.ExportTraceServiceRequest.FromString(body))
            self.reply(pb.ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

        def do_GET(self) -> None:  # noqa: N802
            if self.path != "/spans":
                self.send_error(404)
                return
            self.reply(store.dump(), "application/json")

        def reply(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    store = Store()
    servers = [http.server.ThreadingHTTPServer(("0.0.0.0", p), handler(store)) for p in (OTLP_PORT, QUERY_PORT)]
    threading.Thread(target=servers[1].serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
