"""Decode steps replayed from CUDA graphs: a step's hundreds of kernel launches become one.

A decode step of a 7B model runs a few hundred small kernels; launched one by one from
Python, the launches take longer than the work (the step is bound by launch overhead, not
by reading the weights). A CUDA graph records the step once and replays it in one launch.

A graph has fixed shapes and fixed addresses, so each (batch, width) bucket gets its own,
recorded the first time a step of that shape runs: the batch is rounded up to a power of two
(at most `max_seqs`), and the block-table width (the longest sequence's blocks) to a power of
two. Inputs are copied into the graph's own tensors before each replay. Rows past the real
batch are padding: they read and write one scratch block that no sequence owns, and their
logits are dropped. Every graph draws its intermediates from one shared memory pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from epd.workers.engine.family import Family
from epd.workers.engine.kv_cache import PagedKVCache, StepView, table_rows


def bucket(n: int, cap: int | None = None) -> int:
    b = 1 << max(0, n - 1).bit_length()
    return min(b, cap) if cap is not None and cap >= n else b


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    positions: torch.Tensor
    tables: torch.Tensor
    lengths: torch.Tensor
    logits: torch.Tensor


class GraphedSteps:
    def __init__(self, family: Family, cache: PagedKVCache, max_seqs: int) -> None:
        self.family, self.cache, self.max_seqs = family, cache, max_seqs
        scratch = cache.reserve(cache.block_tokens)
        if scratch is None:
            raise ValueError("the KV cache has no block to spare for CUDA graph padding")
        self.scratch = scratch[0]
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def step(
        self, tokens: list[int], positions: list[int], tables: list[list[int]], lengths: list[int]
    ) -> torch.Tensor:
        """(len(tokens), vocab) logits: one step of these sequences, as `Family.decode_step` computes it."""
        n = len(tokens)
        g = self._graph(bucket(n, self.max_seqs), bucket(self.cache.step_width(lengths)))
        batch, width = g.tables.shape
        pad = batch - n
        rows = table_rows(tables + [[]] * pad, width, fill=self.scratch)
        g.tokens.copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        g.positions.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        g.tables.copy_(torch.tensor(rows), non_blocking=True)
        g.lengths.copy_(torch.tensor(lengths + [0] * pad), non_blocking=True)
        g.graph.replay()
        return g.logits[:n]

    def _graph(self, batch: int, width: int) -> _Graph:
        if (batch, width) in self.graphs:
            return self.graphs[(batch, width)]
        device = self.cache.layout.device
        tokens = torch.zeros(batch, dtype=torch.long, device=device)
        positions = torch.zeros(batch, dtype=torch.long, device=device)
        tables = torch.full((batch, width), self.scratch, dtype=torch.long, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)

        def run() -> torch.Tensor:
            return self.family.decode_step(tokens, positions, StepView(self.cache, tables, lengths))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture: lazy initializations happen here
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        self.graphs[(batch, width)] = _Graph(graph, tokens, positions, tables, lengths, logits)
        return self.graphs[(batch, width)]
