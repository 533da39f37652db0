"""What a stage uses of its process. None of it is a connection: the outbox sends, the image store and the claims
are connectors built on one. A unit test builds `Services` from fakes and runs a stage without NATS."""

from __future__ import annotations

from dataclasses import dataclass

from epd.connectors.image_store import ImageStore
from epd.core.claims import EncodeClaims
from epd.core.config import Settings
from epd.core.ec_events import Landed
from epd.core.outbox import Outbox, RuntimeOutbox
from epd.core.runtime import Cancellations, Load, Runtime


@dataclass
class Services:
    settings: Settings
    out: Outbox  # jobs to other stages, replies and errors to clients
    cancelled: Cancellations  # request ids cancelled recently
    load: Load  # this process's counters, for its heartbeat
    landed: Landed  # embeddings announced as they land in the encoder cache
    images: ImageStore  # image bytes by content key (the gateway stored them)
    claims: EncodeClaims  # which images some request is being encoded for now

    @classmethod
    def of(cls, rt: Runtime) -> Services:
        """A worker process's services, over its NATS runtime."""
        images = ImageStore(rt.js, rt.settings.image_ttl_s)
        return cls(rt.settings, RuntimeOutbox(rt), rt.cancelled, rt.load, rt.landed, images, EncodeClaims(rt.js))
