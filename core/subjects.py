"""NATS subjects and JetStream streams, versioned with the wire schemas."""

from __future__ import annotations

from epd.schemas.common import WIRE_VERSION

PREFIX = f"epd.{WIRE_VERSION}"
REQUEST = f"{PREFIX}.request"  # NATS-native API: publish a Request with a reply subject
ENCODE = f"{PREFIX}.encode"
PREFILL = f"{PREFIX}.prefill"  # requests with images
PREFILL_TEXT = f"{PREFIX}.prefill.text"  # text-only requests: their own consumer, never queued behind images
DECODE = f"{PREFIX}.decode"  # KV ready, for any decoder
CANCEL = f"{PREFIX}.cancel"


def decode_for(worker_id: str) -> str:
    """KV ready for one decoder, the one prefill chose (worker ids hold no dots)."""
    return f"{DECODE}.to.{worker_id}"


def kv_reserve_for(worker_id: str) -> str:
    """Core NATS (no stream): a decoder grants room for a request's KV, or frees it (`KVReserve`, `KVRelease`)."""
    return f"{PREFIX}.kv.reserve.{worker_id}"


def ec_landed(key: str) -> str:
    """Core NATS (no stream): an encoder saved `key`'s embedding (keys hold no dots); `*` for every key."""
    return f"{PREFIX}.ec.landed.{key}"


# stream name -> its subjects; one durable work-queue stream per stage
STREAMS = {"EPD_ENCODE": [ENCODE], "EPD_PREFILL": [PREFILL, PREFILL_TEXT], "EPD_DECODE": [DECODE, decode_for("*")]}

# the shared queues: name (also the durable consumer's name) -> (stream, subject)
QUEUES = {
    "encode": ("EPD_ENCODE", ENCODE),
    "prefill": ("EPD_PREFILL", PREFILL),
    "prefill-text": ("EPD_PREFILL", PREFILL_TEXT),
    "decode": ("EPD_DECODE", DECODE),
}


def stream_of(subject: str) -> str:
    """The stream that stores `subject`."""
    for name, subs in STREAMS.items():
        for s in subs:
            if s == subject or (s.endswith(".*") and subject.startswith(s[:-1]) and "." not in subject[len(s) - 1 :]):
                return name
    raise ValueError(f"no stream stores {subject!r}")


# headers
REPLY_HEADER = "Epd-Reply-To"  # so that even an undecodable message can be answered
REQUEST_ID_HEADER = "Epd-Request-Id"

# key-value bucket of live workers (schemas.status.WorkerStatus); entries expire after the TTL
NATS_MAX_PAYLOAD = 8 * 1024 * 1024  # the servers epd starts and its clients agree; messages carry no image bytes

WORKERS_BUCKET = "epd_workers"
WORKER_TTL_S = 5.0
HEARTBEAT_S = 1.0

# key-value bucket of images being encoded now (in-flight de-duplication); a claim outlives no encode
IMAGES_BUCKET = "epd_images"  # JetStream object store: each image once, under its content key
ENCODING_BUCKET = "epd_encoding"
ENCODING_CLAIM_TTL_S = 30.0
