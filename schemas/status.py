"""Worker heartbeats: each worker puts its status in a NATS key-value bucket with a TTL.

Key `<role>.<worker_id>`; an entry not refreshed within the bucket's TTL disappears,
so the bucket's contents are the live pool. `epd status` and `/ready` read it.
"""

from __future__ import annotations

from epd.schemas.common import Struct


class WorkerStatus(Struct, tag="epd.worker.v1"):
    worker_id: str
    role: str  # encode | prefill | decode | pd | epd
    host: str
    pid: int
    started_at: float  # unix seconds
    updated_at: float
    metrics_url: str = ""  # Prometheus endpoint, empty when off
    capacity: int = 1  # requests it works on at once
    active: int = 0  # requests it works on now
    served: int = 0  # requests finished since start
    failed: int = 0  # of which answered with an error
    ec_hits: int = 0  # encoder-cache lookups that found the embedding
    ec_misses: int = 0
    kv_tokens: int = 0  # tokens of KV cache held by running generations (decoders)
    kv_capacity: int = 0  # tokens of KV cache it may hold (decoders; prefill prefers the most free)
    kv_grants: int = 0  # direct KV transfers it granted room for since start (decoders)
    kv_granted_bytes: int = 0  # room granted now and not yet loaded, released or expired
