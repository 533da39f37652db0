"""Image bytes, stored once by the gateway, fetched by whoever encodes them: messages carry only the key.

The store is a JetStream object store (bucket `epd_images`), not Mooncake Store:
- it lives where the jobs live, so an accepted request's images survive exactly what its job survives
  (a worker's death, a restart of NATS with its store; replicated with the streams in a cluster), while a
  Mooncake key vanishes with the process whose segment holds it;
- it exists in every topology, `epd` included, which runs no Mooncake master;
- images are a few MB and are read once or twice (by the encoder, or by prefill encoding inline): the
  chunked object store moves them at well over what the encoder consumes.

Keys are content keys (`KeySpace.key`), so the same image sent twice is stored once. Objects expire after
`EPD_IMAGE_TTL_S`, well past any request's deadline.
"""

from __future__ import annotations

import nats
from epd.core import subjects
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

BUCKET = subjects.IMAGES_BUCKET
CHUNK_BYTES = 512 * 1024  # under NATS's default 1 MiB max_payload


class ImageMissing(LookupError):
    """An image key with no bytes behind it (expired, or the store lost it)."""


class ImageStore:
    def __init__(self, js: nats.js.JetStreamContext, ttl_s: float = 3600.0) -> None:
        self.js, self.ttl_s = js, ttl_s
        self._bucket: ObjectStore | None = None

    async def _store(self) -> ObjectStore:
        if self._bucket is None:
            try:
                self._bucket = await self.js.object_store(BUCKET)
            except BucketNotFoundError:
                config = ObjectStoreConfig(bucket=BUCKET, ttl=self.ttl_s, storage=StorageType.FILE)
                self._bucket = await self.js.create_object_store(BUCKET, config=config)
        return self._bucket

    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under its content key, unless it is there already (the same key is the same bytes)."""
        store = await self._store()
        try:
            await store.get_info(key)
            return
        except (ObjectNotFoundError, NotFoundError):
            pass
        await store.put(key, data, meta=ObjectMeta(name=key, options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES)))

    async def get(self, key: str) -> bytes:
        """The bytes of `key` (digest-checked by the object store); ImageMissing if there are none."""
        store = await self._store()
        try:
            return bytes((await store.get(key)).data)
        except (ObjectNotFoundError, NotFoundError):
            raise ImageMissing(f"image {key} is not in the image store (expired, or lost)") from None
