"""Continuous batching: every running sequence advances one token per step, in one forward.

Sequences join between steps (their prompt KV is copied into the cache's blocks) and
leave between steps (finished, stopped or cancelled; their blocks return to the pool).
Admission needs a free sequence slot (`EPD_MAX_SEQS`) and the blocks for the whole
generation (`PagedKVCache.reserve`); a request that cannot have them yet waits, and
one that could never fit in this decoder's cache is refused with a clear error.

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
    blocks: list[int]
    last: int  # the newest token: the next step feeds it
    generated: int = 1  # tokens generated so far, prefill's first one included
    kv: torch.Tensor | None = None  # the prompt's KV, until the step loop writes it into the cache
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
        self.seqs: list[Sequence] = []
        self._room = asyncio.Condition()
        self._runner: asyncio.Task | None = None
        load.kv_capacity = cache.capacity_tokens

    async def admit(
        self, request_id: str, kv: torch.Tensor, rope_delta: int, first: int, sampling: SamplingParams
    ) -> Sequence | None:
        """A running sequence continuing after `first`; None if the request was cancelled while it waited."""
        prompt = kv.shape[3]
        need = min(prompt + sampling.max_tokens, self.max_len)
        if self.cache.blocks_for(need) > self.cache.blocks:
            raise RequestFailed(
                400,
                f"the request needs KV for {need} tokens (prompt {prompt} + max_tokens {sampling.max_tokens}); "
                f"a decoder holds {self.cache.capacity_tokens} (EPD_KV_CACHE_MB)",
            )
        async with self._room:
            while len(self.seqs) >= self.max_seqs or (blocks := self.cache.reserve(need)) is None:
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
            while self.seqs:
                for seq in self.seqs:
                    if not seq.done and seq.request_id in self.cancelled:
                        seq.out.put_nowait((None, FinishReason.ABORT))
                        seq.done = True
                await self._release_done()
                live = list(self.seqs)
                if not live:
                    break
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

    def _step(self, live: list[Sequence]) -> list[int]:
        """One forward for every live sequence, then each one's next token (in a worker thread)."""
        for seq in live:
            if seq.kv is not None:
                self.cache.write(seq.blocks, seq.kv)
                seq.kv = None
        tokens, positions = [s.last for s in live], [s.length + s.rope_delta for s in live]
        tables, lengths = [s.blocks for s in live], [s.length for s in live]
        if self._graphs is not None:
            logits = self._graphs.step(tokens, positions, tables, lengths)
        else:
            logits = self.family.decode_step(tokens, positions, self.cache.step_view(tables, lengths))
        greedy = logits.argmax(-1).tolist()
        # a seeded draw depends on the position: the same tokens whichever worker or batch runs it
        return [
            greedy[i] if s.sampling.temperature < MIN_TEMPERATURE else sample(logits[i], s.sampling, s.length + 1)
            for i, s in enumerate(live)
        ]

    async def _release_done(self) -> None:
        done = [s for s in self.seqs if s.done]
        if not done:
            return
        for seq in done:
            self.cache.release(seq.blocks)
            self.seqs.remove(seq)
        self._account()
        async with self._room:
            self._room.notify_all()

    def _account(self) -> None:
        self.load.kv_tokens = self.cache.capacity_tokens - self.cache.free_tokens
        metrics.ACTIVE_SEQUENCES.labels("decode").set(len(self.seqs))
        metrics.KV_TOKENS.labels("decode").set(self.load.kv_tokens)
