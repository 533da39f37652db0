import msgspec
import pytest
from epd.schemas.codec import Decoder, WireError, encode
from epd.schemas.common import (
    FinishReason,
    ImageEmbedding,
    ImagePart,
    Message,
    SamplingParams,
    TensorHandle,
    TextPart,
    Usage,
)
from epd.schemas.control import Cancel
from epd.schemas.decode import KVHandle, KVPath, KVReady
from epd.schemas.encode import EmbeddingReady, EncodeJob
from epd.schemas.prefill import PrefillInput, PrefillJob
from epd.schemas.reply import ErrorReply, Reply, TokenChunk
from epd.schemas.request import Request

pytestmark = pytest.mark.unit

HANDLE = TensorHandle(key="k", shape=[2, 3], dtype="bfloat16", nbytes=12, checksum=2**63 + 5)
REQUEST = Request(
    model="m",
    messages=[Message(role="user", content=[ImagePart(data=b"\x89PNG..."), TextPart(text="what?")])],
    sampling=SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, seed=3),
    request_id="r1",
    reply_to="_INBOX.x",
)
MESSAGES = [
    REQUEST,
    EncodeJob(request=REQUEST, keys=["a"], missing=[0]),
    EmbeddingReady(request=REQUEST, images=[ImageEmbedding(key="a", grid_thw=[1, 4, 6], tensor=HANDLE)]),
    PrefillJob(request=REQUEST, images=[ImageEmbedding(key="a")]),
    KVReady(
        request_id="r1",
        reply_to="x",
        model="m",
        sampling=SamplingParams(),
        prompt_tokens=9,
        first_token=4,
        rope_delta=-3,
        kv=KVHandle(path=KVPath.DIRECT, tensor=HANDLE),
    ),
    TokenChunk(
        request_id="r1",
        seq=3,
        token_ids=[1, 2],
        text="hé",
        finish_reason=FinishReason.LENGTH,
        usage=Usage(prompt_tokens=9, completion_tokens=2),
    ),
    ErrorReply(request_id="r1", status=404, message="no such model", type="invalid_request_error"),
    Cancel(request_id="r1"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: msgspec.Struct) -> None:
    assert Decoder(type(msg)).decode(encode(msg)) == msg


def test_tagged_unions_pick_the_right_type() -> None:
    assert isinstance(Decoder(PrefillInput).decode(encode(MESSAGES[2])), EmbeddingReady)
    assert isinstance(Decoder(PrefillInput).decode(encode(MESSAGES[3])), PrefillJob)
    assert isinstance(Decoder(Reply).decode(encode(MESSAGES[6])), ErrorReply)


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_truncated_bytes_raise_wire_error(msg: msgspec.Struct) -> None:
    data = encode(msg)
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(WireError, match=type(msg).__name__):
            Decoder(type(msg)).decode(data[:cut])


def test_garbage_and_wrong_type_raise_wire_error() -> None:
    with pytest.raises(WireError, match="Request"):
        Decoder(Request).decode(b"\xc1\xff\x00garbage")
    with pytest.raises(WireError, match="epd.cancel.v1"):
        Decoder(Request).decode(encode(Cancel(request_id="x")))  # another message's tag
    with pytest.raises(WireError):
        Decoder(Request).decode(msgspec.msgpack.encode({"kind": "epd.request.v1", "model": 5, "messages": []}))


def test_versions_are_in_the_tags() -> None:
    for msg in MESSAGES:
        assert msgspec.msgpack.decode(encode(msg))["kind"].endswith(".v1")
