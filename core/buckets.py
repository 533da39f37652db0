"""epd's JetStream key-value and object buckets, made up front with the configured replicas.

Each bucket's user still creates it on first use when it is missing (at one replica); every process made with
`Runtime.start` makes them first, with `EPD_NATS_REPLICAS`, so in a cluster they are replicated (R3: the
live-workers table, the encode claims and the stored images survive a node's loss, as the streams do).
The ttl and history here are the ones their users declare (heartbeat, router, image store).
"""

from __future__ import annotations

import logging

import nats
from epd.core import subjects
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType
from nats.js.errors import BadRequestError

log = logging.getLogger(__name__)


async def ensure_buckets(js: nats.js.JetStreamContext, replicas: int, image_ttl_s: float) -> None:
    """Create the buckets at `replicas` unless they exist (an existing one is left as it is)."""
    kv = [
        KeyValueConfig(bucket=subjects.WORKERS_BUCKET, ttl=subjects.WORKER_TTL_S, history=1, replicas=replicas),
        KeyValueConfig(
            bucket=subjects.ENCODING_BUCKET, ttl=subjects.ENCODING_CLAIM_TTL_S, history=1, replicas=replicas
        ),
    ]
    for cfg in kv:
        try:
            await js.key_value(cfg.bucket)
        except nats.js.errors.BucketNotFoundError:
            await _create(js.create_key_value(cfg), cfg.bucket)
    try:
        await js.object_store(subjects.IMAGES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        cfg = ObjectStoreConfig(
            bucket=subjects.IMAGES_BUCKET, ttl=image_ttl_s, storage=StorageType.FILE, replicas=replicas
        )
        await _create(js.create_object_store(subjects.IMAGES_BUCKET, config=cfg), subjects.IMAGES_BUCKET)


async def _create(making: object, name: str) -> None:
    try:
        await making  # type: ignore[misc]
    except BadRequestError as e:  # another process made it meanwhile, alike
        log.debug("bucket %s: %s", name, e)
