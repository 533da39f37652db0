"""Prefill's embedding lookup (workers/embedding_lookup.py) with fakes, no NATS: an in-process encoder cache, a
landing board nobody publishes to but the test, a fake inline encoder and an outbox that records."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import torch
from epd.connectors.ec_memory import InProcessECConnector
from epd.core import subjects
from epd.core.ec_events import Landed
from epd.core.routing import RoutingPolicy
from epd.core.runtime import Load
from epd.schemas.common import ImageEmbedding
from epd.schemas.encode import EmbeddingReady, EncodeJob
from epd.schemas.prefill import PrefillJob
from epd.schemas.request import Request
from epd.workers.embedding_lookup import EmbeddingLookup
from epd.workers.errors import RequestFailed

pytestmark = pytest.mark.unit


def embedding(key: str) -> torch.Tensor:
    return torch.full((4, 8), float(sum(map(ord, key))))  # (image tokens, hidden), telling keys apart


class Outbox:
    def __init__(self) -> None:
        self.published: list[tuple[str, msgspec.Struct, str]] = []

    async def publish(self, subject: str, msg: msgspec.Struct, request_id: str, reply_to: str, stage: str) -> None:
        self.published.append((subject, msg, stage))

    async def reply(self, reply_to: str, msg: msgspec.Struct) -> None:
        raise AssertionError("the lookup never replies")

    error = reply


class Encoder:
    """Encodes inline: saves each missing key's embedding to the cache and announces it, as ImageEncoder does."""

    def __init__(self, ec: InProcessECConnector, landed: Landed) -> None:
        self.ec, self.landed = ec, landed
        self.jobs: list[EncodeJob] = []

    async def encode(self, job: EncodeJob) -> list[ImageEmbedding]:
        self.jobs.append(job)
        for i in job.missing:
            await self.ec.save(job.keys[i], embedding(job.keys[i]), [1, 2, 2])
            self.landed.heard(job.keys[i])
        return [ImageEmbedding(key=k) for k in job.keys]


class Setup:
    def __init__(self, shared_cache: bool = True, inline_fallback: bool = True, encode_wait_s: float = 30.0) -> None:
        self.ec = InProcessECConnector()
        self.landed = Landed(nc=None)  # type: ignore[arg-type]  # only `heard` wakes it here
        self.encoder, self.out, self.load = Encoder(self.ec, self.landed), Outbox(), Load()
        policy = RoutingPolicy(shared_cache, inline_fallback, encode_wait_s)
        self.lookup = EmbeddingLookup(self.ec, policy, self.landed, self.encoder, self.out, self.load)

    async def cache(self, *keys: str) -> None:
        for key in keys:
            await self.ec.save(key, embedding(key), [1, 2, 2])

    async def watched(self, key: str) -> None:
        """Until the lookup waits for `key`'s landing (no clock: it yields until the lookup registered)."""
        while key not in self.landed._waiting:
            await asyncio.sleep(0)


def request() -> Request:
    return Request(model="m", messages=[], request_id="r", reply_to="inbox.r")


def job(keys: list[str], pending: list[int] = (), encode_inline: bool = False) -> PrefillJob:
    images = [ImageEmbedding(key=k) for k in keys]
    return PrefillJob(request=request(), images=images, pending=list(pending), encode_inline=encode_inline)


async def test_hits_come_back_in_the_request_order_and_are_counted() -> None:
    s = Setup()
    await s.cache("a", "b")
    got = await s.lookup.get(job(["b", "a", "b"]))
    assert [torch.equal(e.embedding, embedding(k)) for e, k in zip(got, "bab", strict=True)] == [True] * 3
    assert (s.load.ec_hits, s.load.ec_misses) == (3, 0)
    assert (s.encoder.jobs, s.out.published) == ([], [])


async def test_an_image_encoded_elsewhere_is_waited_for_and_loaded_when_it_lands() -> None:
    s = Setup()
    await s.cache("a")
    lookup = asyncio.create_task(s.lookup.get(job(["a", "b"], pending=[1])))
    await s.watched("b")
    assert not lookup.done()
    await s.cache("b")
    s.landed.heard("b")
    got = await asyncio.wait_for(lookup, 10)  # (a bound against a hang; the landing is what wakes it)
    assert torch.equal(got[1].embedding, embedding("b"))
    assert (s.encoder.jobs, s.out.published) == ([], [])
    assert s.landed._waiting == {}  # the waiter forgot its keys


async def test_a_missed_landing_is_found_by_the_last_look_at_the_deadline() -> None:
    s = Setup(encode_wait_s=0.05)
    lookup = asyncio.create_task(s.lookup.get(job(["a"], pending=[0])))
    await s.watched("a")
    await s.cache("a")  # saved, never announced
    got = await asyncio.wait_for(lookup, 10)
    assert torch.equal(got[0].embedding, embedding("a"))
    assert s.encoder.jobs == []


async def test_an_encode_in_flight_that_times_out_is_encoded_inline() -> None:
    s = Setup(encode_wait_s=0.01)
    await s.cache("a")
    got = await s.lookup.get(job(["a", "b"], pending=[1]))
    assert [j.missing for j in s.encoder.jobs] == [[1]]
    assert s.encoder.jobs[0].again  # what the cache holds for it, if anything, is not usable
    assert torch.equal(got[1].embedding, embedding("b"))


async def test_no_encoder_alive_means_inline_and_the_epd_worker_always_encodes_itself() -> None:
    for s, j in (
        (Setup(), job(["a"], encode_inline=True)),
        (Setup(shared_cache=False, inline_fallback=False), job(["a"])),
    ):
        got = await s.lookup.get(j)
        assert [jb.missing for jb in s.encoder.jobs] == [[0]]
        assert torch.equal(got[0].embedding, embedding("a"))
        assert s.out.published == []


async def test_a_hit_gone_by_prefill_goes_back_to_the_encoders() -> None:
    s = Setup(inline_fallback=False)
    await s.cache("a")
    assert await s.lookup.get(job(["a", "b"])) is None
    [(subject, sent, stage)] = s.out.published
    assert (subject, stage) == (subjects.ENCODE, "encode-again")
    assert (sent.keys, sent.missing, sent.again) == (["a", "b"], [1], True)
    assert s.encoder.jobs == []


async def test_embeddings_gone_after_encoding_anew_fail_instead_of_looping() -> None:
    s = Setup(inline_fallback=False)
    again = EmbeddingReady(request=request(), images=[ImageEmbedding(key="a")], again=True)
    lookup = asyncio.create_task(s.lookup.get(again))
    await s.watched("a")  # from an encoder: it waits a moment for the save to show first
    with pytest.raises(RequestFailed) as failed:
        await asyncio.wait_for(lookup, 10)
    assert failed.value.status == 503
    assert s.out.published == []
