"""The routing policy's decision table (core/routing.py), on CPU: no NATS, no cache, no workers.

The gateway's facts (cache hits, encode claims, the pool) are fakes that record what the policy asked."""

from __future__ import annotations

import pytest
from epd.core.routing import LANDING_GRACE_S, RoutingPolicy, Source
from epd.schemas.common import ImageEmbedding
from epd.schemas.encode import EmbeddingReady
from epd.schemas.prefill import PrefillJob
from epd.schemas.request import Request

pytestmark = pytest.mark.unit

C, E, W, I = Source.CACHED, Source.ENCODE, Source.WAIT, Source.INLINE  # noqa: E741 - the table's letters
SHARED = RoutingPolicy(shared_cache=True, inline_fallback=True, encode_wait_s=30.0)


class Facts:
    """The gateway's view: which keys another request has claimed, whether an encoder is alive; and what was asked."""

    def __init__(self, claimed_elsewhere: set[str] = frozenset(), alive: bool = True) -> None:
        self.claimed_elsewhere, self.alive = set(claimed_elsewhere), alive
        self.claims: list[str] = []
        self.pool_asked = 0

    async def claim(self, key: str) -> bool:
        self.claims.append(key)
        return key not in self.claimed_elsewhere

    async def encoders_alive(self) -> bool:
        self.pool_asked += 1
        return self.alive


async def at_gateway(policy: RoutingPolicy, present: list[bool], facts: Facts) -> list[Source]:
    keys = [f"k{i}" for i in range(len(present))]
    return (await policy.at_gateway(keys, present, facts.claim, facts.encoders_alive)).sources


# (shared cache, inline fallback, in cache, claimed by another, encoder alive) -> source of each image
GATEWAY_TABLE = [
    (True, True, [True, True], set(), True, [C, C]),
    (True, True, [True, False], set(), True, [C, E]),
    (True, True, [False, False], {"k1"}, True, [E, W]),
    (True, True, [False, False], {"k0", "k1"}, True, [W, W]),
    (True, True, [True, False, False], {"k2"}, False, [C, I, W]),  # no encoder: prefill encodes what is claimed
    (True, False, [False], set(), False, [E]),  # fallback off: still to the encoders (admission answers 503)
    (False, True, [True, False], set(), True, [I, I]),  # epd: its own cache, it encodes what that lacks
    (True, True, [], set(), False, []),  # text only
]


@pytest.mark.parametrize(("shared", "fallback", "present", "elsewhere", "alive", "expected"), GATEWAY_TABLE)
async def test_the_gateway_table(
    shared: bool, fallback: bool, present: list[bool], elsewhere: set[str], alive: bool, expected: list[Source]
) -> None:
    policy = RoutingPolicy(shared_cache=shared, inline_fallback=fallback)
    assert await at_gateway(policy, present, Facts(elsewhere, alive)) == expected


async def test_only_missing_images_are_claimed_and_the_pool_is_asked_only_to_fall_back() -> None:
    facts = Facts()
    await at_gateway(SHARED, [True, False, True], facts)
    assert facts.claims == ["k1"]  # a cached image is never claimed (a claim would make others wait on nothing)
    assert facts.pool_asked == 1
    facts = Facts(claimed_elsewhere={"k0"})
    assert await at_gateway(SHARED, [False], facts) == [W]
    assert facts.pool_asked == 0  # nothing to encode: the pool does not matter
    facts = Facts()
    await at_gateway(RoutingPolicy(shared_cache=False, inline_fallback=True), [False], facts)
    assert (facts.claims, facts.pool_asked) == ([], 0)  # epd's cache is its own: no claims across gateways


async def test_the_route_says_where_the_request_goes() -> None:
    route = await SHARED.at_gateway(["a", "b", "c"], [True, False, False], Facts({"c"}).claim, Facts().encoders_alive)
    assert route.to_encoders and not route.inline
    assert (route.where(C), route.where(E), route.where(W)) == ([0], [1], [2])
    route = await SHARED.at_gateway(["a"], [False], Facts().claim, Facts(alive=False).encoders_alive)
    assert route.inline and not route.to_encoders


def request() -> Request:
    return Request(model="m", messages=[], request_id="r")


def prefill_job(n: int, pending: list[int] = (), encode_inline: bool = False) -> PrefillJob:
    images = [ImageEmbedding(key=f"k{i}") for i in range(n)]
    return PrefillJob(request=request(), images=images, pending=list(pending), encode_inline=encode_inline)


def ready(n: int, pending: list[int] = (), again: bool = False) -> EmbeddingReady:
    images = [ImageEmbedding(key=f"k{i}") for i in range(n)]
    return EmbeddingReady(request=request(), images=images, pending=list(pending), again=again)


def test_prefill_waits_for_encodes_in_flight_and_briefly_for_what_an_encoder_just_saved() -> None:
    assert SHARED.wait_for(prefill_job(2), []) is None  # nothing missing
    assert SHARED.wait_for(prefill_job(2, pending=[1]), [1]) == 30.0  # being encoded elsewhere: up to the wait
    assert SHARED.wait_for(prefill_job(2, pending=[1]), [0, 1]) is None  # one nobody encodes: do not wait for it
    assert SHARED.wait_for(prefill_job(2), [0]) is None  # a hit that vanished: re-encode, no wait
    assert SHARED.wait_for(ready(2), [0]) == LANDING_GRACE_S  # just saved, not visible yet: a short wait
    assert SHARED.wait_for(ready(2, pending=[1]), [0, 1]) == 30.0  # the other part's encode is in flight


# (policy, job) -> what prefill does with images still missing after its wait
AFTER_WAIT_TABLE = [
    (SHARED, prefill_job(1, encode_inline=True), I),  # no encoder was alive
    (SHARED, prefill_job(1, pending=[0]), I),  # the encode in flight timed out: fall back
    (SHARED, prefill_job(1), E),  # a hit that vanished: back to the encoders
    (SHARED, ready(1), E),
    (SHARED, ready(1, again=True), Source.FAIL),  # encoded anew and gone again: no loop
    (RoutingPolicy(shared_cache=True, inline_fallback=False), prefill_job(1, pending=[0], encode_inline=True), E),
    (RoutingPolicy(shared_cache=False, inline_fallback=False), prefill_job(1), I),  # epd: always its own encoder
]


@pytest.mark.parametrize(("policy", "job", "expected"), AFTER_WAIT_TABLE)
def test_the_prefill_table_after_waiting(policy: RoutingPolicy, job: PrefillJob | EmbeddingReady, expected: Source):
    assert policy.after_wait(job) is expected
