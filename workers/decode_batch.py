"""Continuous batching: every running sequence advances one token per step, in one forward.

Sequences join between steps (their prompt KV is copied into the cache's blocks) and
leave between steps (finished, stopped or cancelled; their blocks return to the pool).
Admission needs a free sequence slot (`EPD_MAX_SEQS`) and blocks for the prompt and its
next token; a request that cannot have them yet waits, and one whose whole generation
(prompt plus `max_tokens`, at most the model's length) could never fit in this decoder's
cache, even alone, is refused with a clear error.

Blocks are taken as sequences grow: before each step, every sequence, oldest first, gets
the block its next token needs. When none is free, the NEWEST running sequence is
preempted by swapping: its KV (prompt and generated tokens alike) is copied to host
memory, its blocks are freed, and it waits at the head of the queue. (Not by recompute:
a decoder has neither a prompt's token ids nor its images' embeddings, only its KV.)
Preempted sequences resume, oldest first, before any new request is admitted, as soon as
their blocks fit: their KV is written back and they continue from the token they were
about to feed, so no token is sent twice or skipped. The oldest sequence is never
preempted by a newer one, and a sequence alone always fits (admission checked), so the
batch always progresses.

The step loop samples and decides each sequence's finish itself, then queues the token
for the request's task, which only formats and sends replies: a slow client never
holds a step back, and a step never waits for a reply.

With CUDA graphs, steady steps run ahead: while step n is on the device, step n+1 is
queued behind it, fed step n's greedy tokens on the device, so the host's work on step
n's tokens (finish checks, queueing them) overlaps step n+1's kernels and a step costs
about the larger of the two, not their sum. A step runs ahead only when it can be the
same batch as the one before: every sequence greedy, none leaving, none joining or
waiting to resume, and a block free for each one's token after next (taken now). A
sequence that step n finishes had a row in step n+1 anyway: that token is dropped, never
sent. Its blocks are released at once (step n+1 still writes its row into them, but all
device work is on one stream: a new owner's writes and reads are queued after it), so a
request waiting for blocks is not held back a step. Otherwise the loop waits for the step
in flight and schedules the next as usual.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from epd.core import metrics
from epd.schemas.common import FinishReason, SamplingParams
from epd.workers.engine.cuda_graphs import GraphCaptureError
from epd.workers.engine.family import Family
from epd.workers.engine.kv_cache import PagedKVCache
from epd.workers.engine.sampling import MIN_TEMPERATURE, sample
from epd.workers.errors import RequestFailed

if TYPE_CHECKING:
    from epd.core.runtime import Load
    from epd.workers.engine.cuda_graphs import Launched

log = logging.getLogger(__name__)

ADMIT_POLL_S = 0.2  # how often a waiting admission checks for its request's cancellation


def finish_reason(
    token: int, gen_tokens: int, total_tokens: int, params: SamplingParams, eos: set[int], max_len: int
) -> FinishReason | None:
    if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
        return FinishReason.STOP
    if gen_tokens >= params.max_tokens or total_tokens >= max_len:
        return FinishReason.LENGTH
    return None


@dataclass(eq=False)
class Sequence:
    request_id: str
    sampling: SamplingParams
    prompt_tokens: int
    rope_delta: int
    blocks: list[int]  # cover `length` tokens, and one more once scheduled for a step
    last: int  # the newest token: the next step feeds it
    generated: int = 1  # tokens generated so far, prefill's first one included
    # KV to write into `blocks` before the next step: the prompt's at admission, all it held after a preemption
    kv: torch.Tensor | None = None
    done: bool = False
    finished: bool = False  # the step loop sent its finish reason: a step that ran ahead sends it nothing more
    # what the step loop produced: (token, finish reason), (None, ABORT), or an exception
    out: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def length(self) -> int:
        """Tokens whose KV the cache holds (the newest token's is written by the next step)."""
        return self.prompt_tokens + self.generated - 1


class DecodeBatch:
    def __init__(
        self,
        family: Family,
        cache: PagedKVCache,
        max_seqs: int,
        eos: set[int],
        max_len: int,
        cancelled: Container[str],
        load: Load,
        cuda_graphs: bool = True,
        run_ahead: bool = True,
    ) -> None:
        """`cuda_graphs`: on a CUDA device, replay steps from graphs (`engine/cuda_graphs.py`); `run_ahead`: with
        them, queue a steady step before the last one's tokens are read (the module's docstring)."""
        self.family, self.cache, self.max_seqs, self.eos, self.max_len = family, cache, max_seqs, eos, max_len
        self.cancelled, self.load, self.run_ahead = cancelled, load, run_ahead
        self._graphs = None
        self._delivered: tuple[tuple[int, ...], float] = ((), 0.0)  # the last step's batch (ids) and its time
        if cuda_graphs and family.device.type == "cuda":
            from epd.workers.engine.cuda_graphs import GraphedSteps

            self._graphs = GraphedSteps(family, cache, max_seqs)
        self.usable_blocks = cache.free_blocks  # (less the graphs' scratch block)
        self.seqs: list[Sequence] = []  # running, in admission order: the newest last
        self.preempted: list[Sequence] = []  # swapped out, the oldest first
        self.preemptions = 0
        self._room = asyncio.Condition()
        self._runner: asyncio.Task | None = None
        load.kv_capacity = cache.capacity_tokens

    async def admit(
        self, request_id: str, kv: torch.Tensor, rope_delta: int, first: int, sampling: SamplingParams
    ) -> Sequence | None:
        """A running sequence continuing after `first`; None if the request was cancelled while it waited."""
        prompt = kv.shape[3]
        need = min(prompt + sampling.max_tokens, self.max_len)
        if self.cache.blocks_for(need) > self.usable_blocks:
            raise RequestFailed(
                400,
                f"the request needs KV for {need} tokens (prompt {prompt} + max_tokens {sampling.max_tokens}); "
                f"a decoder holds {self.cache.capacity_tokens} (EPD_KV_CACHE_MB)",
            )
        async with self._room:
            while (
                len(self.seqs) + len(self.preempted) >= self.max_seqs
                or self.preempted  # those resume first
                or (blocks := self.cache.reserve(prompt + 1)) is None
            ):
                if request_id in self.cancelled:
                    return None
                try:
                    await asyncio.wait_for(self._room.wait(), ADMIT_POLL_S)
                except asyncio.TimeoutError:
                    pass
        seq = Sequence(request_id, sampling, prompt, rope_delta, blocks, first, kv=kv)
        self.seqs.append(seq)
        self._account()
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
        return seq

    def leave(self, seq: Sequence) -> None:
        """The request needs no more tokens (finished, stop string, client gone); it leaves before the next step."""
        seq.done = True

    async def _run(self) -> None:
        pending: Launched | None = None  # a step on the device whose tokens are not delivered yet
        live: list[Sequence] = []  # its sequences
        try:
            while self.seqs or self.preempted or pending is not None:
                for seq in self.seqs + self.preempted:
                    if not seq.done and seq.request_id in self.cancelled:
                        seq.out.put_nowait((None, FinishReason.ABORT))
                        seq.done = seq.finished = True
                if pending is not None:
                    ahead = self._can_run_ahead(live)
                    if ahead:
                        metrics.BATCH_SIZE.labels("decode").observe(len(live))
                    try:
                        tokens, pending = await asyncio.to_thread(self._finish_and_launch, pending, live, ahead)
                    except Exception as e:
                        pending = None
                        self._fail_step(live, e)
                        continue
                    self._deliver(live, tokens)
                    # a finished sequence's blocks are free now, though the step in flight writes its row into them:
                    # whatever reuses them is queued after that step on the same stream
                    await self._release_done()
                    continue
                await self._release_done()
                live = self._schedule()
                if not live:  # (every one left was failed or cancelled: released next round)
                    continue
                metrics.BATCH_SIZE.labels("decode").observe(len(live))
                try:
                    if self._graphs is not None and all(s.sampling.temperature < MIN_TEMPERATURE for s in live):
                        try:
                            pending = await asyncio.to_thread(self._launch, live)  # read on the next round
                            continue
                        except GraphCaptureError:
                            log.exception("decode steps run eagerly from now on")
                            self._graphs = None
                    tokens = await asyncio.to_thread(self._step, live)
                except Exception as e:  # e.g. out of device memory: these requests fail, the decoder serves on
                    self._fail_step(live, e)
                    continue
                self._deliver(live, tokens)
        finally:
            self._runner = None

    @staticmethod
    def _fail_step(live: list[Sequence], e: Exception) -> None:
        for seq in live:
            if not seq.finished:
                seq.out.put_nowait(e)
            seq.done = True

    def _deliver(self, live: list[Sequence], tokens: list[int]) -> None:
        """Each sequence's new token and its finish check; a sequence finished by an earlier step gets nothing."""
        now, batch = time.perf_counter(), tuple(map(id, live))
        if batch == self._delivered[0]:  # the same batch as the step before: one step's time, no join or leave
            metrics.DECODE_STEP.observe(now - self._delivered[1])
        self._delivered = (batch, now)
        for seq, token in zip(live, tokens, strict=True):
            if seq.finished:
                continue
            seq.generated += 1
            seq.last = token
            reason = finish_reason(
                token, seq.generated, seq.prompt_tokens + seq.generated, seq.sampling, self.eos, self.max_len
            )
            seq.out.put_nowait((token, reason))
            seq.finished = reason is not None
            seq.done = seq.done or seq.finished

    def _can_run_ahead(self, live: list[Sequence]) -> bool:
        """Whether the next step can be queued before `live`'s step in flight is read: the same batch (module
        docstring). Takes each sequence's block for its token after next."""
        if not self.run_ahead or self.preempted or self.seqs != live or any(s.done for s in live):
            return False
        if any(s.sampling.temperature >= MIN_TEMPERATURE for s in live):
            return False
        # the step in flight adds one token to each; the next writes the one after it
        grown = all(self.cache.grow(s.blocks, s.length + 2) for s in live)
        self._account()
        return grown

    def _launch(self, live: list[Sequence]) -> Launched:
        """Queue one greedy step from the host's tokens (a worker thread)."""
        self._write_pending_kv(live)
        tokens, positions = [s.last for s in live], [s.length + s.rope_delta for s in live]
        return self._graphs.launch(tokens, positions, [s.blocks for s in live], [s.length for s in live])

    def _finish_and_launch(
        self, pending: Launched, live: list[Sequence], ahead: bool
    ) -> tuple[list[int], Launched | None]:
        """`pending`'s tokens; with `ahead`, the next step of the same sequences is queued first, fed them on the
        device (a worker thread: the wait for the device happens here)."""
        following = None
        if ahead:  # each sequence is one token further than the host has recorded
            lengths = [s.length + 1 for s in live]
            positions = [x + s.rope_delta for x, s in zip(lengths, live, strict=True)]
            tables = [s.blocks for s in live]
            following = self._graphs.launch([0] * len(live), positions, tables, lengths, feed=pending.greedy)
        return pending.tokens(), following

    def _write_pending_kv(self, live: list[Sequence]) -> None:
        for seq in live:
            if seq.kv is not None:
                self.cache.write(seq.blocks, seq.kv)
                seq.kv = None

    def _schedule(self) -> list[Sequence]:
        """The next step's sequences, each with the blocks for one more token (the module's policy)."""
        while self.preempted and len(self.seqs) < self.max_seqs:
            seq = self.preempted[0]
            if not self.cache.grow(seq.blocks, seq.length + 1):
                if self.seqs:
                    break  # it waits for their blocks
                self._fail(self.preempted.pop(0), "a preempted sequence found no room in an empty KV cache")
                continue
            self.seqs.append(self.preempted.pop(0))
        for seq in list(self.seqs):  # oldest first
            while seq in self.seqs and not seq.done and not self.cache.grow(seq.blocks, seq.length + 1):
                if len(self.seqs) == 1:  # alone and no room: admission's check should have made this impossible
                    self._fail(seq, "a sequence alone found no free KV block")
                else:
                    self._preempt(self.seqs[-1])
        self._account()
        return [s for s in self.seqs if not s.done]

    @staticmethod
    def _fail(seq: Sequence, why: str) -> None:
        seq.out.put_nowait(RequestFailed(500, why, "server_error"))
        seq.done = True

    def _preempt(self, seq: Sequence) -> None:
        """Swap `seq` out: its KV to host memory (between steps: nothing writes the cache now), its blocks freed."""
        if seq.kv is None:  # (a sequence admitted but never run still holds its prompt's KV here)
            seq.kv = self.cache.read(seq.blocks, seq.length).to("cpu")
        self.cache.release(seq.blocks)
        self.seqs.remove(seq)
        self.preempted.insert(0, seq)
        self.preemptions += 1
        metrics.PREEMPTIONS.labels("decode").inc()

    def _step(self, live: list[Sequence]) -> list[int]:
        """One forward for every live sequence, then each one's next token (in a worker thread)."""
        self._write_pending_kv(live)
        tokens, positions = [s.last for s in live], [s.length + s.rope_delta for s in live]
        tables, lengths = [s.blocks for s in live], [s.length for s in live]
        if self._graphs is not None:
            logits, greedy = self._graphs.step(tokens, positions, tables, lengths)
        else:
            logits = self.family.decode_step(tokens, positions, self.cache, self.cache.step_inputs(tables, lengths))
            greedy = logits.argmax(-1)
        chosen = greedy.tolist()  # the step's one read back to the host
        # a seeded draw depends on the position: the same tokens whichever worker or batch runs it
        return [
            chosen[i] if s.sampling.temperature < MIN_TEMPERATURE else sample(logits[i].cpu(), s.sampling, s.length + 1)
            for i, s in enumerate(live)
        ]

    async def _release_done(self) -> None:
        done = [s for s in self.seqs + self.preempted if s.done]
        if not done:
            return
        for seq in done:
            self.cache.release(seq.blocks)
            seq.kv = None
            (self.seqs if seq in self.seqs else self.preempted).remove(seq)
        self._account()
        async with self._room:
            self._room.notify_all()

    def _account(self) -> None:
        self.load.kv_tokens = self.cache.capacity_tokens - self.cache.free_tokens
        metrics.ACTIVE_SEQUENCES.labels("decode").set(len(self.seqs))
        metrics.KV_TOKENS.labels("decode").set(self.load.kv_tokens)
