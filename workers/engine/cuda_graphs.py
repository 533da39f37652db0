"""Decode steps replayed from CUDA graphs: a step's hundreds of kernel launches become one.

A decode step of a 7B model runs a few hundred small kernels; launched one by one from
Python, the launches take longer than the work. A CUDA graph records the step once and
replays it in one launch, sampling included: the greedy token of each row is chosen on the
device, so a step reads back one small tensor of tokens.

A graph has fixed shapes and fixed addresses, so each (batch, width) bucket gets its own,
recorded the first time a step of that shape runs: the batch (at most `max_seqs`) and the
block-table width (the longest sequence's blocks) are rounded up to the next of 1, 2, 4, 6,
8, 12, 16, 24, 32, 48, 64, ... (a padded row costs little: a step reads the weights once
whatever its batch); the attention reads each row only up to its
length, so a wider table costs its copy, not its reads. A step's inputs (tokens, positions,
slots, lengths, tables) travel in one host-to-device copy into the graph's own buffer. Rows
past the real batch are padding: length 0 (no attention), their new KV written into one
scratch block that no sequence owns, their tokens dropped. Every graph draws its
intermediates from one shared memory pool.

A step can run ahead (`launch` with `feed`): its tokens are the previous step's greedy tokens,
still on the device, copied into its inputs by the stream before it replays, so it is queued
before the previous step's tokens reach the host. Each step's tokens come back through a
non-blocking copy into pinned memory and an event (`Launched.tokens` waits for that step alone).
Staging and read-back buffers alternate between two sets, since two steps can be in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from epd.workers.engine.family import Family
from epd.workers.engine.kv_cache import PagedKVCache, StepInputs, table_rows


def bucket(n: int, cap: int | None = None) -> int:
    """The power of two at or above n, or 1.5 times the one below when that is enough; at most `cap` (if >= n)."""
    b = 1 << max(0, n - 1).bit_length()
    if b >= 8 and n <= 3 * b // 4:
        b = 3 * b // 4
    return min(b, cap) if cap is not None and cap >= n else b


class GraphCaptureError(RuntimeError):
    """A step could not be recorded; the decoder runs its steps eagerly from then on."""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    staged: tuple[torch.Tensor, torch.Tensor]  # 2 x (4 * batch + batch * width,) int32, pinned host memory
    inputs: torch.Tensor  # the same on the device: tokens, positions, slots, lengths, then the tables
    logits: torch.Tensor  # (batch, vocab) float32
    greedy: torch.Tensor  # (batch,) int64


@dataclass
class Launched:
    """One step queued on the device: its outputs (valid until its graph replays again) and their read-back."""

    logits: torch.Tensor  # (n, vocab) float32, on the device
    greedy: torch.Tensor  # (n,) int64, on the device
    host: torch.Tensor  # (n,) int64, pinned: the greedy tokens once `done` has passed
    done: torch.cuda.Event

    def tokens(self) -> list[int]:
        """The greedy tokens on the host: waits for this step (and those before it), not for later ones."""
        self.done.synchronize()
        return self.host.tolist()


class GraphedSteps:
    def __init__(self, family: Family, cache: PagedKVCache, max_seqs: int) -> None:
        self.family, self.cache, self.max_seqs = family, cache, max_seqs
        scratch = cache.reserve(cache.block_tokens)
        if scratch is None:
            raise ValueError("the KV cache has no block to spare for CUDA graph padding")
        self.scratch = scratch[0]
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.read_back = [torch.zeros(bucket(max_seqs), dtype=torch.int64).pin_memory() for _ in range(2)]
        self.launches = 0  # which staging and read-back set the next launch uses

    def step(
        self, tokens: list[int], positions: list[int], tables: list[list[int]], lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, vocab) logits and (n,) greedy tokens on the device: one step of these n sequences, as
        `Family.decode_step` computes it (`lengths`: tokens each holds; its blocks cover one more)."""
        launched = self.launch(tokens, positions, tables, lengths)
        return launched.logits, launched.greedy

    def launch(
        self,
        tokens: list[int],
        positions: list[int],
        tables: list[list[int]],
        lengths: list[int],
        feed: torch.Tensor | None = None,
    ) -> Launched:
        """Queue one step; `feed` (n,) on the device, when given, replaces `tokens` (the previous step's greedy
        tokens, in the same rows: the step runs ahead of the host reading them)."""
        n = len(tokens)
        g = self._graph(bucket(n, self.max_seqs), bucket(max(self.cache.blocks_for(x + 1) for x in lengths)))
        batch, width = g.logits.shape[0], (g.inputs.numel() - 4 * g.logits.shape[0]) // g.logits.shape[0]
        pad = batch - n
        slots = [self.cache.slot(t, x) for t, x in zip(tables, lengths, strict=True)]
        scratch_slot = self.scratch * self.cache.block_tokens
        rows = table_rows(tables, width, fill=self.scratch) + [[self.scratch] * width] * pad
        flat = (
            tokens + [0] * pad
            + positions + [0] * pad
            + slots + [scratch_slot] * pad
            + [x + 1 for x in lengths] + [0] * pad
            + [b for row in rows for b in row]
        )  # fmt: skip
        # this set's last copy was queued two launches ago, before a step whose tokens were read since: done
        which = self.launches % 2
        self.launches += 1
        staged = g.staged[which]
        staged.copy_(torch.tensor(flat, dtype=torch.int32))
        g.inputs.copy_(staged, non_blocking=True)  # one copy: pinned host -> device
        if feed is not None:
            g.inputs[:n].copy_(feed)  # on the stream: the previous step has written them by now
        g.graph.replay()
        host = self.read_back[which][:n]
        host.copy_(g.greedy[:n], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Launched(g.logits[:n], g.greedy[:n], host, done)

    def _graph(self, batch: int, width: int) -> _Graph:
        if (batch, width) in self.graphs:
            return self.graphs[(batch, width)]
        device = self.cache.layout.device
        inputs = torch.zeros(4 * batch + batch * width, dtype=torch.int32, device=device)
        tokens, positions, slots, lengths = inputs[: 4 * batch].view(4, batch)
        tables = inputs[4 * batch :].view(batch, width)
        slots.fill_(self.scratch * self.cache.block_tokens)

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            step = StepInputs(slots.long(), tables, lengths)
            logits = self.family.decode_step(tokens, positions, self.cache, step)
            return logits, logits.argmax(-1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture: lazy initializations (and Triton's JIT) happen here
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the process's other threads (a pd or epd worker's prefill, the encoder) keep using the
        # device while this records; in the default global mode their calls would break the capture
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits, greedy = run()
        except RuntimeError as e:
            raise GraphCaptureError(f"recording the decode step for batch {batch}, width {width}: {e}") from e
        staged = tuple(torch.zeros(inputs.shape, dtype=torch.int32).pin_memory() for _ in range(2))
        self.graphs[(batch, width)] = _Graph(graph, staged, inputs, logits, greedy)
        return self.graphs[(batch, width)]
