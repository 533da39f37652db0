"""NATS subjects and JetStream streams, versioned with the wire schemas."""

from __future__ import annotations

from epd.schemas.common import WIRE_VERSION

PREFIX = f"epd.{WIRE_VERSION}"
REQUEST = f"{PREFIX}.request"  # NATS-native API: publish a Request with a reply subject
ENCODE = f"{PREFIX}.encode"
PREFILL = f"{PREFIX}.prefill"
DECODE = f"{PREFIX}.decode"
CANCEL = f"{PREFIX}.cancel"

# stream name -> subject; one durable work-queue stream per stage
STREAMS = {"EPD_ENCODE": ENCODE, "EPD_PREFILL": PREFILL, "EPD_DECODE": DECODE}

# headers
REPLY_HEADER = "Epd-Reply-To"  # so that even an undecodable message can be answered
REQUEST_ID_HEADER = "Epd-Request-Id"

# key-value bucket of live workers (schemas.status.WorkerStatus); entries expire after the TTL
WORKERS_BUCKET = "epd_workers"
WORKER_TTL_S = 5.0
HEARTBEAT_S = 1.0

# key-value bucket of images being encoded now (in-flight de-duplication); a claim outlives no encode
ENCODING_BUCKET = "epd_encoding"
ENCODING_CLAIM_TTL_S = 30.0
