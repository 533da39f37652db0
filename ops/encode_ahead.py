"""epd's encoders in front of a stock `vllm serve`: put images in the shared encoder cache, get their keys.

vLLM runs the language model, with `EpdECConnector` (connectors/ec_vllm.py) in the consumer role on the same
cache; epd's encode pool (`epd worker encode`, any count, any hosts) runs the vision tower. A client:

1. `keys = await encode_ahead(settings, images)`: each image's content key; the images the cache lacks are
   stored once in epd's image store, claimed in the in-flight bucket (as epd's gateway does, so two clients
   never encode one image twice) and queued for epd's encoders, as one job with no hand-over.
2. sends its chat request to vLLM with `"uuid": key` on each image part.
3. vLLM's scheduler finds the key and loads the embedding instead of encoding. While epd still encodes it,
   the connector (given `nats_url`) holds the request back until the entry lands; `wait_s` here waits instead.

    python -m epd.ops.encode_ahead IMAGE...   # prints one key per image (EPD_NATS_URL, EPD_EC_* as for workers)
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

from epd.connectors.ec import ECConnector
from epd.connectors.image_store import ImageStore
from epd.connectors.keys import KeySpace
from epd.connectors.mooncake_store import MooncakeStore
from epd.core import subjects
from epd.core.claims import EncodeClaims
from epd.core.config import Settings, export_mooncake_env
from epd.core.runtime import Runtime
from epd.schemas.common import ImagePart, Message
from epd.schemas.encode import EncodeJob
from epd.schemas.request import Request
from epd.workers.roles import ec_connector

POLL_S = 0.05


def shared_cache(settings: Settings) -> tuple[ECConnector, MooncakeStore | None]:
    """The cache the workers share; a Mooncake client here lends no memory (it only asks what exists)."""
    export_mooncake_env(settings)  # (a client's process: its Mooncake client advertises this address)
    store = MooncakeStore(settings, segment_mb=0) if settings.ec_backend == "mooncake" else None
    return ec_connector(settings, store), store  # type: ignore[arg-type]  # shared-dir needs no store


async def encode_ahead(settings: Settings, images: list[bytes], wait_s: float | None = None) -> list[str]:
    """The content key of each image (vLLM's `uuid` for it), once the missing ones are queued for epd's
    encoders; with `wait_s`, once they are in the cache (TimeoutError past it)."""
    keyspace = KeySpace.for_checkpoint(Path(settings.model))
    keys = [keyspace.key(image) for image in images]
    ec, _ = shared_cache(settings)
    rt = await Runtime.start(settings, "encode-ahead")
    try:
        present = await ec.exists(keys)
        absent = [i for i, there in enumerate(present) if not there and keys.index(keys[i]) == i]
        store, claims = ImageStore(rt.js, settings.image_ttl_s), EncodeClaims(rt.js)
        await asyncio.gather(*(store.put(keys[i], images[i]) for i in absent))
        mine = [i for i in absent if await claims.claim(keys[i])]  # the others: another client's encode
        if mine:
            request_id = uuid.uuid4().hex
            content = [ImagePart(key=k, nbytes=len(im)) for k, im in zip(keys, images, strict=True)]
            request = Request(
                model=settings.model_name, messages=[Message(role="user", content=content)], request_id=request_id
            )
            job = EncodeJob(request=request, keys=keys, missing=mine, handoff=False)
            await rt.publish(subjects.ENCODE, job, request_id, "", "encode")
        if wait_s is not None:
            deadline = time.monotonic() + wait_s
            while not all(await ec.exists(keys)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"epd's encoders did not cache {len(absent)} image(s) in {wait_s} s")
                await asyncio.sleep(POLL_S)
        return keys
    finally:
        await rt.nc.close()


def main(argv: list[str]) -> None:
    images = [Path(a).read_bytes() for a in argv]
    for key in asyncio.run(encode_ahead(Settings(), images)):
        print(key)


if __name__ == "__main__":
    main(sys.argv[1:])
