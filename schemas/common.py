"""Types shared by several links."""

from __future__ import annotations

from enum import IntEnum

import msgspec

WIRE_VERSION = "v1"


class Struct(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="kind"):
    """Base for every wire struct: keyword-only, defaults left off the wire."""


class TextPart(Struct, tag="text"):
    text: str


class ImagePart(Struct, tag="image"):
    """An image: encoded file bytes (PNG, JPEG, ...), never pixels. A client sends `data`; the gateway stores
    the bytes in the image store (`connectors/image_store.py`) and passes on only their `key` and size."""

    data: bytes = b""
    key: str = ""  # the content key of the bytes in the image store, once stored
    nbytes: int = 0


class Message(Struct):
    role: str  # system | user | assistant
    content: list[TextPart | ImagePart]


class SamplingParams(Struct):
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # the k most likely tokens only; 0 (or -1) keeps all
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens regardless of EOS (benchmarks, tests)
    stop: list[str] = msgspec.field(default_factory=list)  # output ends before the first of these
    stop_token_ids: list[int] = msgspec.field(default_factory=list)  # output ends at these (not shown)


class FinishReason(IntEnum):
    STOP = 1  # EOS or a stop token
    LENGTH = 2  # max_tokens or the model's maximum length
    ABORT = 3  # cancelled
    ERROR = 4


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int


class TensorHandle(Struct):
    """Where a tensor's bytes are and what they must look like when loaded."""

    key: str  # store key (Mooncake Store) or remote address
    shape: list[int]
    dtype: str  # torch dtype name without the prefix: "float32", "bfloat16"
    nbytes: int
    checksum: int  # XXH3-64 of the bytes


class ImageEmbedding(Struct):
    """One image of a request: its encoder-cache key, and a handle once encoded."""

    key: str
    grid_thw: list[int] = []  # (t, h, w) patches; empty when only the key is known
    tensor: TensorHandle | None = None
