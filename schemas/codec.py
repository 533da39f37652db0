"""msgpack encoding and typed decoding; bad bytes raise `WireError`, never anything else."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


class WireError(ValueError):
    """Bytes that are not a valid message of the expected type."""


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


class Decoder(Generic[T]):
    """Decode one message type (or a tagged union of several)."""

    def __init__(self, type_: Any) -> None:
        self._type_name = getattr(type_, "__name__", str(type_))
        self._decoder = msgspec.msgpack.Decoder(type_)

    def decode(self, data: bytes) -> T:
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise WireError(f"invalid {self._type_name} message ({len(data)} bytes): {e}") from None
