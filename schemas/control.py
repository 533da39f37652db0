"""Broadcast control messages."""

from __future__ import annotations

from epd.schemas.common import Struct


class Cancel(Struct, tag="epd.cancel.v1"):
    request_id: str
