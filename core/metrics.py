"""Prometheus metrics of every epd process, defined in one place so their names are easy to find.

The gateway serves them at `GET /metrics`; each worker on its own port (`EPD_METRICS_PORT`,
0 picks a free one, -1 turns it off). Every metric has a label, so a process only exports the
series it actually touched.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

disable_created_metrics()  # no `_created` series: Prometheus does not need them

# latency buckets from 5 ms to 2 min; per-token buckets from 1 ms to 5 s
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# -- gateway: what a client sees
REQUESTS = Counter("epd_requests", "Requests answered by the gateway, by HTTP status", ["model", "status"])
TTFT = Histogram("epd_time_to_first_token_seconds", "Request arrival to first token", ["model"], buckets=_LATENCY)
TPOT = Histogram(
    "epd_time_per_output_token_seconds", "Mean time between output tokens of a request", ["model"], buckets=_PER_TOKEN
)
E2E = Histogram("epd_e2e_request_latency_seconds", "Request arrival to last token", ["model"], buckets=_LATENCY)
PROMPT_TOKENS = Counter("epd_prompt_tokens", "Prompt tokens of finished requests", ["model"])
RESUMES = Counter(
    "epd_resumed_requests", "Requests the gateway continued from their tokens so far (a decoder or NATS lost them)"
)
GENERATION_TOKENS = Counter("epd_generation_tokens", "Tokens generated for finished requests", ["model"])

# -- every stage
ERRORS = Counter("epd_errors", "Requests answered with an error, by where and error type", ["stage", "type"])
QUEUE_WAIT = Histogram(
    "epd_queue_wait_seconds", "Time a job waited in its JetStream stream, publish to fetch", ["stage"], buckets=_LATENCY
)
QUEUE_DEPTH = Gauge("epd_queue_depth", "Jobs waiting in a stage's stream, not yet delivered", ["stage"])
STAGE_DURATION = Histogram("epd_stage_duration_seconds", "Time a worker spent on one job", ["stage"], buckets=_LATENCY)
IN_FLIGHT = Gauge("epd_in_flight_jobs", "Jobs a worker is working on", ["stage"])
DECODE_STEP = Histogram(
    "epd_decode_step_seconds",
    "Time from one decode step's tokens reaching the host to the next's: the engine's time per output token",
    buckets=(0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25),
)
BATCH_SIZE = Histogram(
    "epd_batch_size",
    "Items per forward pass: images (encode), prompts (prefill), sequences (decode)",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)

LOOP_LAG = Histogram(
    "epd_event_loop_lag_seconds",
    "How late the process's event loop ran a timer due every 50 ms: time it spent in work that did not yield "
    "(a blocking call, a device wait on its thread, the GIL held by other threads), which every job waited too",
    ["process"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# -- connectors and caches
EC_LOOKUPS = Counter("epd_encoder_cache_lookups", "Encoder-cache lookups, by result (hit, miss)", ["where", "result"])
CONNECTOR_BYTES = Counter(
    "epd_connector_bytes", "Bytes moved by a connector", ["connector", "direction"]
)  # connector: ec | kv; direction: save | load
KV_TOKENS = Gauge("epd_kv_cache_tokens", "Tokens of KV cache held by running generations", ["stage"])
ACTIVE_SEQUENCES = Gauge("epd_active_sequences", "Sequences being decoded", ["stage"])
PREEMPTIONS = Counter("epd_preemptions", "Sequences swapped out of a full KV cache, to resume later", ["stage"])


def serve_metrics(bind_host: str, port: int, reachable_host: str) -> str:
    """Start the Prometheus endpoint in a thread; returns its URL, or '' when `port` is negative."""
    if port < 0:
        return ""
    server, _ = start_http_server(port, addr=bind_host)
    return f"http://{reachable_host}:{server.server_port}/metrics"


# -- `epd up`'s supervisor
RESTARTS = Counter("epd_restarts", "Processes `epd up` started again after they exited", ["process", "kind"])
