"""The engine on a CUDA device against its CPU path: Triton attention and CUDA graphs change no token.

- float32, a random-weight tiny model: the continuous batch on the GPU (Triton kernels, CUDA graphs)
  gives the same greedy tokens as on the CPU (torch attention, eager), and as the GPU without graphs;
  the kernels' prefill and decode agree with the torch path on the model's own KV.
- bfloat16, the shipped demo model (trained, not noise): graphs and eager give the same answers, each to
  its end of turn (past it, a trained model's logits are noise too).

Runs where a CUDA device is (the one skip CI takes: it has none). Self-contained, so that it runs on a
GPU machine without the broker's packages: `pytest --noconftest tests/test_gpu_engine.py`.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from .prompts import engine_prompt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEMO = Path(__file__).resolve().parents[1] / "models" / "epd-demo-qwen2-vl"
QUESTIONS = ["What shape is it?", "What color is the shape?", "Describe the image.", "Hello, how are you today?"]


def prompts(ckpt, family, n: int, seed: int) -> list[tuple[list[int], list]]:  # noqa: ANN001
    """`n` prompts: demo-style pictures with questions, every fourth one text only."""
    from epd.tools import shapes

    rng = random.Random(seed)
    return [
        engine_prompt(ckpt, family, QUESTIONS[i % 4], [] if i % 4 == 3 else [shapes.draw(rng).image]) for i in range(n)
    ]


def decode_all(  # noqa: ANN001
    ckpt, family, batch_prompts, new: int, graphs: bool, eos: bool = False, params_of=None
) -> list[list[int]]:
    """Every prompt prefilled in one forward, then decoded together in one continuous batch (`eos`: each stops
    at the model's end of turn; otherwise every one makes `new` tokens; `params_of(i)`: request i's own)."""
    from epd.schemas.common import SamplingParams
    from epd.workers.decode_batch import DecodeBatch
    from epd.workers.engine.kv_cache import PagedKVCache

    class Load:  # the heartbeat's figures (the real one imports the broker's client)
        kv_tokens = kv_capacity = 0

    cache = PagedKVCache(family.kv_layout(), 64 * 2**20)
    stops = ckpt.eos_token_ids() if eos else set()
    batch = DecodeBatch(family, cache, 64, stops, ckpt.max_model_len(), set(), Load(), cuda_graphs=graphs)
    params = SamplingParams(max_tokens=new, temperature=0.0)

    async def run() -> list[list[int]]:
        async def one(i: int, out) -> list[int]:  # noqa: ANN001
            tokens = [int(out.logits.argmax())]
            if tokens[0] in stops:
                return tokens
            seq = await batch.admit(f"r{i}", out.kv, out.rope_delta, tokens[0], params_of(i) if params_of else params)
            while True:
                token, reason = await seq.out.get()
                tokens.append(token)
                if reason is not None:
                    return tokens

        done = family.prefill_batch(batch_prompts)
        return await asyncio.gather(*(one(i, out) for i, out in enumerate(done)))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from epd.tools.tiny_model import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl")


def test_float32_gpu_with_kernels_and_graphs_gives_the_cpu_tokens(tiny: Path) -> None:
    from epd.workers.engine import load_family
    from epd.workers.engine.attention import triton_kernels
    from epd.workers.engine.checkpoint import Checkpoint

    assert triton_kernels() is not None  # the kernels are what this compares
    ckpt = Checkpoint.open(tiny)
    cpu, gpu = load_family(ckpt), load_family(ckpt, device="cuda")
    batch = prompts(ckpt, cpu, 12, seed=1)
    on_gpu = [(ids, [type(e)(e.embedding.cuda(), e.grid_thw) for e in enc]) for ids, enc in batch]
    expected = decode_all(ckpt, cpu, batch, 40, graphs=False)
    assert decode_all(ckpt, gpu, on_gpu, 40, graphs=True) == expected
    assert decode_all(ckpt, gpu, on_gpu, 40, graphs=False) == expected


def test_float32_steps_that_run_ahead_send_nothing_after_a_finish(tiny: Path) -> None:
    """Graphs queue step n+1 before step n's tokens are read: sequences finishing at different steps (a stop
    token, max_tokens) get exactly the eager path's tokens, none past their finish."""
    from epd.schemas.common import SamplingParams
    from epd.workers.engine import load_family
    from epd.workers.engine.checkpoint import Checkpoint

    ckpt = Checkpoint.open(tiny)
    gpu = load_family(ckpt, device="cuda")
    batch = [(ids, [type(e)(e.embedding.cuda(), e.grid_thw) for e in enc]) for ids, enc in prompts(ckpt, gpu, 8, 5)]
    free = decode_all(ckpt, gpu, batch, 30, graphs=False)
    # request i stops at its own step: the token it made at step 3 + 3i (if not seen before), or at 8 + 2i tokens
    stop_at = [3 + 3 * i for i in range(8)]
    params = [
        SamplingParams(max_tokens=8 + 2 * i, temperature=0.0)
        if i % 2
        else SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[free[i][stop_at[i]]])
        for i in range(8)
    ]
    eager = decode_all(ckpt, gpu, batch, 30, graphs=False, params_of=params.__getitem__)
    assert len({len(t) for t in eager}) > 4  # they finish at different steps
    assert decode_all(ckpt, gpu, batch, 30, graphs=True, params_of=params.__getitem__) == eager


def test_float32_kernels_agree_with_the_torch_path_on_the_models_kv(tiny: Path) -> None:
    from epd.workers.engine import attention
    from epd.workers.engine.checkpoint import Checkpoint
    from epd.workers.engine.weights import load_model

    ckpt = Checkpoint.open(tiny)
    _, text, _ = load_model(ckpt, torch.device("cuda"), torch.float32, "language")
    kernels = attention.triton_kernels()
    gen = torch.Generator().manual_seed(3)
    lengths = [1, 17, 40, 5]
    heads, kv_heads, dim = text.config.num_attention_heads, text.config.num_key_value_heads, text.head_dim
    q = torch.randn(sum(lengths), heads, dim, generator=gen).cuda()
    k, v = (torch.randn(sum(lengths), kv_heads, dim, generator=gen).cuda() for _ in range(2))
    cu = torch.tensor([0, 1, 18, 58, 63], dtype=torch.int32, device="cuda")
    got = kernels.varlen_prefill(q, k, v, cu, max(lengths), dim**-0.5)
    torch.testing.assert_close(got, attention.varlen_prefill_torch(q, k, v, cu, dim**-0.5), rtol=1e-4, atol=1e-4)
    blocks = torch.randperm(16, generator=gen).view(4, 4).to(torch.int32).cuda()
    k_cache, v_cache = (torch.randn(16, 16, kv_heads, dim, generator=gen).cuda() for _ in range(2))
    seq_lens = torch.tensor([0, 1, 33, 64], dtype=torch.int32, device="cuda")
    qd = q[:4].contiguous()
    got = kernels.paged_decode(qd, k_cache, v_cache, blocks, seq_lens, dim**-0.5)
    want = attention.paged_decode_torch(qd, k_cache, v_cache, blocks, seq_lens, dim**-0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1:], want[1:], rtol=1e-4, atol=1e-4)


def test_bfloat16_demo_model_graphs_give_the_eager_tokens() -> None:
    from epd.workers.engine import load_family
    from epd.workers.engine.checkpoint import Checkpoint

    ckpt = Checkpoint.open(DEMO)
    family = load_family(ckpt, device="cuda", dtype="bfloat16")
    batch = prompts(ckpt, family, 20, seed=2)
    eager = decode_all(ckpt, family, batch, 24, graphs=False, eos=True)  # what the model answers, to its end
    assert decode_all(ckpt, family, batch, 24, graphs=True, eos=True) == eager
    assert all(len(t) < 24 for t in eager)  # each answered and stopped
