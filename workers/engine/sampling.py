"""Per-request sampling: greedy, or temperature, top-k and top-p with a seed that survives P -> D."""

from __future__ import annotations

import torch
from epd.schemas.common import SamplingParams

MIN_TEMPERATURE = 1e-5


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Next token from (vocab,) logits. `position` makes seeded draws the same on any worker."""
    if params.temperature < MIN_TEMPERATURE:  # 0, or so small that it is greedy in all but name
        return int(torch.argmax(logits))
    logits = logits.double()  # float64: no overflow at small T
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed((params.seed * 1_000_003 + position) & 0x7FFF_FFFF_FFFF_FFFF)
    return int(torch.multinomial(probs, 1, generator=gen))
