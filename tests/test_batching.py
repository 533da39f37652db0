"""Batching in the engine: packed encode, packed prefill and continuous decode change nobody's tokens.

Both families, without NATS: the same code the workers run, against transformers' `generate`.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from epd.core.runtime import Load
from epd.schemas.common import SamplingParams
from epd.workers.decode_batch import DecodeBatch
from epd.workers.engine import load_family
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.cuda_graphs import GraphCaptureError
from epd.workers.engine.family import Family
from epd.workers.engine.kv_cache import PagedKVCache
from epd.workers.errors import RequestFailed
from epd.workers.micro_batch import MicroBatcher
from prometheus_client import REGISTRY

from .conftest import engine_prompt as prompt
from .conftest import pictures, png_bytes
from .oracle import reference

pytestmark = pytest.mark.unit
MAX_NEW = 14

CASES: list[tuple[str, list[bytes]]] = [
    ("What shape is it?", [png_bytes(size=(100, 80), color=(30, 200, 90), shape="circle")]),
    ("Hello, how are you today?", []),
    ("Describe the image.", [png_bytes(size=(200, 120), color=(200, 30, 30), shape="circle")]),
    (
        "What color is the shape?",
        [png_bytes(size=(56, 90), color=(20, 20, 220), shape="circle"), png_bytes(size=(130, 60), color=(9, 9, 9))],
    ),
]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def engine(request: pytest.FixtureRequest, tiny_model: Path, tiny_qwen2_5_vl: Path) -> tuple[Path, Checkpoint, Family]:
    path = tiny_model if request.param == "qwen2_vl" else tiny_qwen2_5_vl
    ckpt = Checkpoint.open(path)
    assert ckpt.family == request.param
    return path, ckpt, load_family(ckpt)


def new_batch(ckpt: Checkpoint, family: Family, mb: float = 4, max_seqs: int = 8, cancelled: set | None = None):  # noqa: ANN201
    cache = PagedKVCache(family.kv_layout(), int(mb * 2**20))
    cancelled = set() if cancelled is None else cancelled
    batch = DecodeBatch(family, cache, max_seqs, ckpt.eos_token_ids(), ckpt.max_model_len(), cancelled, Load())
    return cache, batch


async def generate(batch: DecodeBatch, family: Family, rid: str, ids, encoded, sampling: SamplingParams) -> list[int]:  # noqa: ANN001
    out = family.prefill(ids, encoded)
    first = int(torch.argmax(out.logits)) if sampling.temperature == 0 else None
    assert first is not None or sampling.seed is not None
    if first is None:
        from epd.workers.engine.sampling import sample

        first = sample(out.logits, sampling, len(ids))
    tokens = [first]
    seq = await batch.admit(rid, out.kv, out.rope_delta, first, sampling)
    assert seq is not None
    while True:
        token, reason = await seq.out.get()
        tokens.append(token)
        if reason is not None:
            return tokens


def test_encoding_images_together_equals_one_at_a_time(engine) -> None:  # noqa: ANN001
    _, _, family = engine
    images = pictures([im for _, ims in CASES for im in ims])
    together = family.encode(images)
    for image, packed in zip(images, together, strict=True):
        alone = family.encode([image])[0]
        assert packed.grid_thw == alone.grid_thw
        torch.testing.assert_close(packed.embedding, alone.embedding, rtol=1e-4, atol=1e-5)


def test_prefill_together_equals_one_at_a_time(engine) -> None:  # noqa: ANN001
    _, ckpt, family = engine
    prompts = [prompt(ckpt, family, q, ims) for q, ims in CASES]
    assert len({len(ids) for ids, _ in prompts}) == len(prompts)  # different lengths, packed back to back
    for (ids, enc), together in zip(prompts, family.prefill_batch(prompts), strict=True):
        alone = family.prefill(ids, enc)
        assert together.rope_delta == alone.rope_delta and together.kv.shape[3] == len(ids)
        torch.testing.assert_close(together.kv, alone.kv, rtol=1e-4, atol=1e-5)
        assert int(together.logits.argmax()) == int(alone.logits.argmax())


async def test_requests_joining_a_running_decode_batch_get_generates_tokens(engine) -> None:  # noqa: ANN001
    path, ckpt, family = engine
    expected = [reference(path, q, ims or None, MAX_NEW)[0] for q, ims in CASES]
    cache, batch = new_batch(ckpt, family)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    sizes: list[int] = []

    async def staggered(i: int) -> list[int]:
        while i and sum(s.generated for s in batch.seqs) < 3 * i:  # join after the others made some tokens
            await asyncio.sleep(0.001)
        sizes.append(len(batch.seqs))
        return await generate(batch, family, f"r{i}", *prompt(ckpt, family, *CASES[i]), greedy)

    got = await asyncio.gather(*(staggered(i) for i in range(len(CASES))))
    assert got == expected
    assert max(sizes) >= 2  # some joined a batch already running
    assert cache.free_tokens == cache.capacity_tokens and batch.load.kv_tokens == 0 and not batch.seqs


async def test_the_decoders_step_time_counts_the_steps_of_an_unchanged_batch(engine) -> None:  # noqa: ANN001
    _, ckpt, family = engine
    _, batch = new_batch(ckpt, family)
    count = lambda: REGISTRY.get_sample_value("epd_decode_step_seconds_count") or 0.0  # noqa: E731
    before = count()
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    tokens = await generate(batch, family, "r0", *prompt(ckpt, family, *CASES[1]), greedy)
    steps = len(tokens) - 1  # the first token came from prefill
    assert steps > 2 and count() - before == steps - 1  # the first step has no step before it to time from


class UnrecordableGraphs:
    """Stands in for `GraphedSteps` on a machine without CUDA: every recording fails, as one that overlaps
    another thread's device work did on an H200."""

    def __init__(self) -> None:
        self.tries = 0

    def launch(self, *args: object, **kwargs: object) -> None:
        self.tries += 1
        raise GraphCaptureError("recording the decode step for batch 1, width 1: capture invalidated")


async def test_a_step_that_cannot_be_recorded_runs_eagerly_and_nobody_fails(engine) -> None:  # noqa: ANN001
    path, ckpt, family = engine
    question, images = CASES[0]
    cache, batch = new_batch(ckpt, family)
    batch._graphs = graphs = UnrecordableGraphs()
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    got = await generate(batch, family, "r0", *prompt(ckpt, family, question, images), greedy)
    assert got == reference(path, question, images or None, MAX_NEW)[0]
    assert graphs.tries == 1 and batch._graphs is None  # tried once, then eager for good
    assert cache.free_tokens == cache.capacity_tokens


async def test_a_seeded_sample_draws_the_same_tokens_alone_and_in_a_batch(engine) -> None:  # noqa: ANN001
    _, ckpt, family = engine
    seeded = SamplingParams(max_tokens=MAX_NEW, temperature=1.5, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    _, alone_batch = new_batch(ckpt, family)
    alone = await generate(alone_batch, family, "a", *prompt(ckpt, family, *CASES[0]), seeded)
    _, shared = new_batch(ckpt, family)
    together = await asyncio.gather(
        generate(shared, family, "s", *prompt(ckpt, family, *CASES[0]), seeded),
        *(generate(shared, family, f"g{i}", *prompt(ckpt, family, *CASES[i]), greedy) for i in (1, 2)),
    )
    assert together[0] == alone and len(alone) == MAX_NEW


async def test_a_full_cache_preempts_the_newest_and_every_output_still_equals_generate(engine) -> None:  # noqa: ANN001
    """Blocks for the prompts, not for what they generate: the cache runs out as they grow, the newest
    sequences are swapped out and resume later, and nobody's tokens change (none sent twice, none skipped)."""
    path, ckpt, family = engine
    new = 40  # every sequence crosses at least two block boundaries
    expected = [reference(path, q, ims or None, new)[0] for q, ims in CASES]
    prompts = [prompt(ckpt, family, *case) for case in CASES]
    layout = family.kv_layout()
    sizing = PagedKVCache(layout, 1 << 20)
    blocks = sum(sizing.blocks_for(len(ids) + 1) for ids, _ in prompts) + 1
    assert max(sizing.blocks_for(len(ids) + new) for ids, _ in prompts) <= blocks  # each fits alone
    cache, batch = new_batch(ckpt, family, mb=blocks * 16 * layout.bytes_per_token() / 2**20)
    assert cache.blocks == blocks
    greedy = SamplingParams(max_tokens=new, temperature=0.0)
    got = await asyncio.gather(*(generate(batch, family, f"r{i}", *p, greedy) for i, p in enumerate(prompts)))
    assert batch.preemptions >= 1
    assert got == expected
    assert cache.free_tokens == cache.capacity_tokens and not batch.seqs and not batch.preempted


async def test_a_preempted_sequence_can_be_cancelled_while_it_waits(engine) -> None:  # noqa: ANN001
    _, ckpt, family = engine
    cancelled: set[str] = set()
    ids, enc = prompt(ckpt, family, *CASES[1])
    sizing = PagedKVCache(family.kv_layout(), 1 << 20)
    blocks = sizing.blocks_for(len(ids) + 60)  # room for one such sequence, not two
    cache, batch = new_batch(
        ckpt, family, mb=blocks * 16 * family.kv_layout().bytes_per_token() / 2**20, cancelled=cancelled
    )
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    out = family.prefill(ids, enc)
    first = await batch.admit("first", out.kv, out.rope_delta, 1, long)
    second = await batch.admit("second", out.kv, out.rope_delta, 1, long)
    while not batch.preempted:
        await second.out.get()
    assert batch.preempted == [second] and second.blocks == []
    cancelled.add("second")
    while (item := await second.out.get())[0] is not None:
        pass
    assert item[1].name == "ABORT"
    while (await first.out.get())[1] is None:  # the first runs to its end
        pass
    assert first.generated == 60 and not batch.preempted
    while batch.seqs:
        await asyncio.sleep(0.001)
    assert cache.free_tokens == cache.capacity_tokens


async def test_admission_refuses_what_can_never_fit(engine) -> None:  # noqa: ANN001
    _, ckpt, family = engine
    ids, enc = prompt(ckpt, family, *CASES[1])
    cache, batch = new_batch(ckpt, family, mb=0.5)
    with pytest.raises(RequestFailed, match="EPD_KV_CACHE_MB") as e:
        await batch.admit("huge", family.prefill(ids, enc).kv, 0, 1, SamplingParams(max_tokens=4000))
    assert e.value.status == 400
    assert cache.free_tokens == cache.capacity_tokens


async def test_a_cancelled_sequence_leaves_and_frees_its_blocks(engine) -> None:  # noqa: ANN001
    _, ckpt, family = engine
    cancelled: set[str] = set()
    cache, batch = new_batch(ckpt, family, cancelled=cancelled)
    ids, enc = prompt(ckpt, family, *CASES[1])
    out = family.prefill(ids, enc)
    seq = await batch.admit("gone", out.kv, out.rope_delta, 1, SamplingParams(max_tokens=1000, ignore_eos=True))
    assert cache.free_tokens < cache.capacity_tokens
    await seq.out.get()
    cancelled.add("gone")
    while (item := await seq.out.get())[0] is not None:
        pass
    assert item[1].name == "ABORT"
    while batch.seqs:
        await asyncio.sleep(0.001)
    assert cache.free_tokens == cache.capacity_tokens


def test_the_cache_gives_back_what_it_was_given() -> None:
    from epd.workers.engine.kv_cache import KVLayout

    layout = KVLayout(layers=3, kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    cache = PagedKVCache(layout, 10 * 16 * layout.bytes_per_token())
    assert cache.blocks == 10
    kv = torch.randn(3, 2, 2, 37, 8)
    blocks = cache.reserve(30)
    assert blocks is not None and len(blocks) == 2
    assert cache.grow(blocks, 37) and len(blocks) == 3  # a block more
    assert cache.grow(blocks, 48) and len(blocks) == 3  # still fits
    cache.write(blocks, kv)
    assert torch.equal(cache.read(blocks, 37), kv)
    assert cache.slot(blocks, 33) == blocks[2] * 16 + 1
    assert cache.reserve(8 * 16) is None and cache.free_tokens == 7 * 16  # all or nothing
    assert not cache.grow(blocks, 11 * 16) and len(blocks) == 3
    cache.release(blocks)
    cache.release(blocks)  # twice frees nothing more
    assert cache.free_tokens == cache.capacity_tokens


async def test_a_failing_item_fails_alone_and_the_rest_of_its_batch_is_served() -> None:
    batches: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        batches.append(items)
        if "bad" in items:
            raise ValueError("bad item")
        return [i.upper() for i in items]

    batcher = MicroBatcher(run, max_batch=8, stage="test")
    results = await asyncio.gather(*(batcher.submit(i) for i in ["a", "bad", "c"]), return_exceptions=True)
    assert results[0] == ("A", 1) and results[2] == ("C", 1)
    assert isinstance(results[1], ValueError)
    assert batches[0] == ["a", "bad", "c"]  # they were tried together first


async def test_what_queues_while_busy_runs_together_within_the_limits() -> None:
    batches: list[list[int]] = []
    batcher = MicroBatcher(lambda xs: batches.append(xs) or xs, max_batch=3, stage="test", cost=sum, max_cost=10)
    results = await asyncio.gather(*(batcher.submit(i) for i in [1, 2, 3, 4, 9, 1]))
    assert [r for r, _ in results] == [1, 2, 3, 4, 9, 1]
    assert batches == [[1, 2, 3], [4], [9, 1]]  # at most 3 items; cost at most 10 (9 goes alone or first)


async def test_an_urgent_item_overtakes_the_queue_and_waits_only_for_the_running_batch() -> None:
    """Prefill's text-only prompts against pictures' queued ahead of them: the urgent ones run next, in their
    order, and the others keep theirs."""
    started, release = threading.Event(), threading.Event()
    batches: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        if not batches:
            started.set()
            assert release.wait(30)
        batches.append(items)
        return items

    batcher = MicroBatcher(run, max_batch=2, stage="test")
    first = asyncio.ensure_future(batcher.submit("img0"))
    assert await asyncio.to_thread(started.wait, 30)  # img0 runs; everything below queues behind it
    queued = [asyncio.ensure_future(batcher.submit(f"img{i}")) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    text = [asyncio.ensure_future(batcher.submit(t, urgent=True)) for t in ("txt1", "txt2", "txt3")]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *queued, *text)
    assert batches == [["img0"], ["txt1", "txt2"], ["txt3", "img1"], ["img2", "img3"]]


async def test_the_next_batch_is_prepared_while_the_current_one_runs() -> None:
    """With a prepare stage, batch 2's preparation happens during batch 1's run: run 1 waits for it (bounded:
    a batcher that prepared only after running would leave it waiting and fail the assertion)."""
    second_prepared = threading.Event()
    seen: list[str] = []

    def prepare(items: list[int]) -> list[int]:
        seen.append(f"prepare {items}")
        if items == [2, 3]:
            second_prepared.set()
        return [i * 10 for i in items]

    def run(prepared: list[int]) -> list[int]:
        seen.append(f"run {prepared}")
        if prepared == [10]:
            assert second_prepared.wait(30), "batch 2 was not prepared while batch 1 ran"
        return [p + 1 for p in prepared]

    batcher = MicroBatcher(run, max_batch=8, stage="test", prepare=prepare)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    while batcher._queue:  # batch 1 is taken alone; 2 and 3 queue behind it
        await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    assert await first == (11, 1)
    assert [await r for r in rest] == [(21, 2), (31, 2)]
    assert seen.index("prepare [2, 3]") < seen.index("run [20, 30]")


async def test_a_failed_preparation_fails_only_its_bad_item() -> None:
    def prepare(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("bad image")
        return items

    batcher = MicroBatcher(lambda xs: [x.upper() for x in xs], max_batch=8, stage="test", prepare=prepare)
    results = await asyncio.gather(*(batcher.submit(i) for i in ["a", "bad", "c"]), return_exceptions=True)
    assert results[0] == ("A", 1) and results[2] == ("C", 1)
    assert isinstance(results[1], ValueError)
