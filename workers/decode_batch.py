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
"""

from __future__ import annotations

import asyncio
from collections.abc import Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from epd.ops import metrics
from epd.schemas.common import FinishReason, SamplingParams
from epd.workers.engine.family import Family
from epd.workers.engine.kv_cache import PagedKVCache
from epd.workers.engine.sampling import MIN_TEMPERATURE, sample
from epd.workers.errors import RequestFailed

if TYPE_CHECKING:
    from epd.workers.runtime import Load

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
    ) -> None:
        """`cuda_graphs`: on a CUDA device, replay steps from graphs (`engine/cuda_graphs.py`)."""
        self.family, self.cache, self.max_seqs, self.eos, self.max_len = family, cache, max_seqs, eos, max_len
        self.cancelled, self.load = cancelled, load
        self._graphs = None
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
        try:
            while self.seqs or self.preempted:
                for seq in self.seqs + self.preempted:
                    if not seq.done and seq.request_id in self.cancelled:
                        seq.out.put_nowait((None, FinishReason.ABORT))
                        seq.done = True
                await self._release_done()
                live = self._schedule()
                if not live:  # (every one left was failed or cancelled: released next round)
                    continue
                metrics.BATCH_SIZE.labels("decode").observe(len(live))
                try:
                    tokens = await asyncio.to_thread(self._step, live)
                except Exception as e:  # e.g. out of device memory: these requests fail, the decoder serves on
                    for seq in live:
                        seq.out.put_nowait(e)
                        seq.done = True
                    continue
                for seq, token in zip(live, tokens, strict=True):
                    seq.generated += 1
                    seq.last = token
                    reason = finish_reason(
                        token, seq.generated, seq.prompt_tokens + seq.generated, seq.sampling, self.eos, self.max_len
                    )
                    seq.out.put_nowait((token, reason))
                    seq.done = seq.done or reason is not None
        finally:
            self._runner = None

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
        for seq in live:
            if seq.kv is not None:
                self.cache.write(seq.blocks, seq.kv)
                seq.kv = None
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
