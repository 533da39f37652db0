"""The engine on a GPU: a random-weight model of Qwen2.5-VL-7B's shape in bfloat16, against transformers.

Every figure is measured in one run, on one device, beside its naive baseline on the same model
and inputs (transformers run one request at a time, as a server without batching would):

- memory bandwidth: a large device-to-device copy (bytes read plus written, over the time);
- encoder images/s at 448x448 and 1024x1024: our vision tower (`vision.py`) and transformers', each packed
  (one forward for the whole batch) and one image at a time on the same pixels, and `encode` (the image
  processor, then our packed forward);
- encoder images/s from image bytes (JPEG) to an embedding in the encoder cache's staging buffer (host memory
  that `write_entry` fills as the Mooncake connector does, one copy from the device, checksummed there): ours
  with the torch preprocessing on the device (`image_preprocess.py`), packed, one image at a time, and through
  the encoder's pipelined batcher (decode + preprocess of the next batch while the current one runs); beside
  transformers' tower after its image processor (PIL on the CPU), packed and one at a time, on the same bytes;
  with the torch pixels' distance from the processor's;
- prefill tokens/s: `prefill_batch` over 8 prompts of 1,024 tokens (one packed forward, our
  language model) against transformers' forward (what `generate` does first) one prompt at a time;
- decode tokens/s at 1, 32 and 64 concurrent sequences of 512-token prompts, 128 new tokens: the
  continuous batch (`DecodeBatch`, our model on the paged KV cache) against `generate` one request
  at a time, and against `generate` on the whole group as one static batch (a stronger baseline);
- each decode step against its read bound: the language model's weight bytes plus the KV the step
  reads (every sequence's context, at the middle of the generation), over the measured bandwidth.

A line is printed as each phase starts and ends.

    python bench/engine_gpu.py [--layers 28] [--new-tokens 128] [--encoder-only] [--out bench/results/engine_gpu.json]
    python bench/engine_gpu.py --device cpu --small      # a check that the encoder part runs, on the CPU

`--layers` below 28 makes a quick smoke run; `--encoder-only` stops after the encoder figures. Needs a CUDA device,
except with `--device cpu --small`: a tiny random model, small images, the encoder figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

OUT = Path(__file__).resolve().parent / "results" / "engine_gpu.json"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn: Any, repeat: int = 3) -> float:
    """Median seconds of `fn()` after one warm-up, synchronized around each run."""
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy, counting bytes read and written."""
    a = torch.randn(2**31 // 2, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    b = torch.empty_like(a)
    seconds = cuda_time(lambda: b.copy_(a), repeat=10)
    return 2 * a.numel() * a.element_size() / seconds  # both freed on return


def noise_images(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def bench_encoder(family: Any, side: int, n: int) -> dict[str, float]:
    """Images/s of our tower (`family.vision`) and transformers' (`family.model.model.visual`) on the same pixels,
    each packed (the whole batch in one forward) and one image at a time; `encode` with the image processor."""
    images = noise_images(n, side, side)
    visual = family.model.model.visual
    batch = family.ckpt.image_processor(images=images, return_tensors="pt")
    dev, dtype = family.device, family.dtype
    pixels = batch["pixel_values"].to(dev, dtype)
    grid = batch["image_grid_thw"].to(dev)
    grids = grid.tolist()
    per_image = [family.ckpt.image_processor(images=[im], return_tensors="pt") for im in images]
    singles = [(b["pixel_values"].to(dev, dtype), b["image_grid_thw"].to(dev)) for b in per_image]

    def with_processor() -> None:
        b = family.ckpt.image_processor(images=images, return_tensors="pt")
        family.encode_prepared(b["pixel_values"].to(dev, dtype), b["image_grid_thw"].tolist())

    def theirs_naive() -> None:
        with torch.inference_mode():
            for px, g in singles:
                visual(px, grid_thw=g)

    def theirs_packed() -> None:
        with torch.inference_mode():
            visual(pixels, grid_thw=grid)

    def ours_naive() -> None:
        with torch.inference_mode():
            for px, g in singles:
                family.vision(px, g.tolist())

    def ours_packed() -> None:
        with torch.inference_mode():
            family.vision(pixels, grids)

    with torch.inference_mode():
        want = visual(pixels, grid_thw=grid).pooler_output.float()
        got = family.vision(pixels, grids).float()
    return {
        "images": n,
        "side": side,
        "tokens_per_image": int(grid[0].prod()) // 4,
        "ours_packed_images_per_s": n / cuda_time(ours_packed),
        "ours_one_at_a_time_images_per_s": n / cuda_time(ours_naive),
        "naive_images_per_s": n / cuda_time(theirs_naive),
        "packed_forward_images_per_s": n / cuda_time(theirs_packed),  # transformers' tower, packed (the old figure)
        "encode_with_processor_images_per_s": n / cuda_time(with_processor),
        "encode_with_torch_preprocessing_images_per_s": n / cuda_time(lambda: family.encode(images)),
        "ours_vs_theirs_relative_error": ((got - want).norm() / want.norm()).item(),
    }


def jpeg_images(n: int, side: int, seed: int) -> list[bytes]:
    """Noise images as JPEG bytes (quality 90): what a client sends, decoded by the encoder."""
    out = []
    for im in noise_images(n, side, seed):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Staging:
    """The encoder cache's staging buffer: host memory (pinned beside a GPU) that each embedding is written into
    as the Mooncake connector writes it (`write_entry`: one copy from the device, the checksum, the header)."""

    def __init__(self, nbytes: int) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())

    def save(self, keys: list[str], embeddings: list[torch.Tensor], grids: list[list[int]]) -> int:
        from epd.connectors.ec import entry_room, write_entry

        at = 0
        for key, emb, grid in zip(keys, embeddings, grids, strict=True):
            room = entry_room(key, emb, grid)
            write_entry(self.buf[at : at + room], key, emb, grid)
            at += room
        return at


def bench_bytes_to_embedding(family: Any, side: int, n: int, max_batch: int = 8) -> dict[str, Any]:
    """Images/s from JPEG bytes to embeddings in the staging buffer: ours (torch preprocessing on the device,
    our tower) packed, one at a time and through the pipelined batcher; transformers' (its image processor, its
    tower) packed and one at a time; and how far the torch pixels sit from the processor's."""
    from epd.core.images import open_image
    from epd.workers.micro_batch import MicroBatcher

    data = jpeg_images(n, side, side + 1)
    keys = [f"img{i}" for i in range(n)]
    visual, processor = family.model.model.visual, family.ckpt.image_processor
    dev = family.device
    sample = family.encode([open_image(data[0])])[0].embedding
    staging = Staging(n * (sample.numel() * sample.element_size() + 4096))

    def decode(items: list[bytes]) -> list[np.ndarray]:
        return [np.asarray(open_image(d, i)) for i, d in enumerate(items)]

    def ours(idx: list[int]) -> None:
        with torch.inference_mode():
            encoded = family.encode_prepared(*family.prepare(decode([data[i] for i in idx])))
            sync()
            staging.save([keys[i] for i in idx], [e.embedding for e in encoded], [e.grid_thw for e in encoded])

    def theirs(idx: list[int]) -> None:
        with torch.inference_mode():
            batch = processor(images=[open_image(data[i], i) for i in idx], return_tensors="pt")
            grid = batch["image_grid_thw"].to(dev)
            merged = visual(batch["pixel_values"].to(dev, family.dtype), grid_thw=grid).pooler_output
            sizes = (grid.prod(-1) // 4).tolist()
            staging.save([keys[i] for i in idx], list(torch.split(merged, sizes)), batch["image_grid_thw"].tolist())

    def pipelined() -> None:
        def prepare(items: list[int]) -> tuple:
            return family.prepare(decode([data[i] for i in items])), items

        def run(prepared: tuple) -> list[None]:
            (pixels, grids), items = prepared
            with torch.inference_mode():
                encoded = family.encode_prepared(pixels, grids)
                sync()
                staging.save([keys[i] for i in items], [e.embedding for e in encoded], grids)
            return [None] * len(items)

        async def all_of_them() -> None:
            batcher = MicroBatcher(run, max_batch, "bench", prepare=prepare)
            await asyncio.gather(*(batcher.submit(i) for i in range(n)))

        asyncio.run(all_of_them())

    everything = list(range(n))
    want = processor(images=[open_image(d) for d in data], return_tensors="pt")["pixel_values"]
    got = float32_pixels(family, decode(data)).cpu()  # the torch path's pixels before the cast to the tower's dtype
    return {
        "images": n,
        "side": side,
        "image_bytes": sum(len(d) for d in data),
        "torch_preprocessing": family.preprocessor is not None,
        "torch_pixels_equal_processor": torch.equal(got, want),
        "torch_pixels_max_abs_diff": (got - want).abs().max().item(),
        "ours_packed_images_per_s": n / cuda_time(lambda: ours(everything)),
        "ours_one_at_a_time_images_per_s": n / cuda_time(lambda: [ours([i]) for i in everything]),
        "ours_pipelined_images_per_s": n / cuda_time(pipelined),
        "theirs_packed_images_per_s": n / cuda_time(lambda: theirs(everything)),
        "theirs_one_at_a_time_images_per_s": n / cuda_time(lambda: [theirs([i]) for i in everything]),
    }


def float32_pixels(family: Any, images: list[np.ndarray]) -> torch.Tensor:
    """The torch path's float32 pixel values of these images (as the processor gives them, before any cast)."""
    from epd.workers.engine.image_preprocess import Settings, TorchImageProcessor

    return TorchImageProcessor(Settings.of(family.ckpt.image_processor), family.device, torch.float32)(images)[0]


def bench_prefill(family: Any, prompts: int, tokens: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 150000, (tokens,), generator=gen).tolist() for _ in range(prompts)]
    model = family.model

    def naive() -> None:
        with torch.inference_mode():
            for row in ids:
                model(input_ids=torch.tensor([row], device="cuda"), use_cache=True, logits_to_keep=1)

    t_naive = cuda_time(naive)
    t_ours = cuda_time(lambda: family.prefill_batch([(row, []) for row in ids]))
    total = prompts * tokens
    return {
        "prompts": prompts,
        "tokens": tokens,
        "naive_tokens_per_s": total / t_naive,
        "ours_tokens_per_s": total / t_ours,
    }


def new_batch(family: Any, cache_mb: int, graphs: bool, run_ahead: bool = True) -> Any:
    """A continuous batch on its own cache; reused across runs, so that its CUDA graphs are recorded once."""
    from epd.workers.decode_batch import DecodeBatch
    from epd.workers.engine.kv_cache import PagedKVCache

    class Load:
        kv_tokens = kv_capacity = 0

    cache = PagedKVCache(family.kv_layout(), cache_mb * 2**20)
    return DecodeBatch(family, cache, 256, set(), 32768, set(), Load(), cuda_graphs=graphs, run_ahead=run_ahead)


async def _decode_ours(batch: Any, prefilled: list, new: int) -> tuple[float, list[float], list[list[int]]]:
    """Seconds for every sequence to make `new` tokens, step gaps seen by the first, and the tokens."""
    from epd.schemas.common import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    seqs = [
        await batch.admit(f"r{i}", p.kv, p.rope_delta, int(p.logits.argmax()), params) for i, p in enumerate(prefilled)
    ]
    stamps: list[float] = []

    async def drain(seq: Any, record: bool) -> list[int]:
        tokens = []
        while True:
            token, reason = await seq.out.get()
            tokens.append(token)
            if record:
                stamps.append(time.perf_counter())
            if reason is not None:
                return tokens

    out = await asyncio.gather(*(drain(s, i == 0) for i, s in enumerate(seqs)))
    torch.cuda.synchronize()
    return time.perf_counter() - started, [b - a for a, b in zip(stamps, stamps[1:], strict=False)], out


T0 = time.perf_counter()


def phase(what: str) -> None:
    """A progress line: a run takes minutes, and a machine's lease is short."""
    print(f"[{time.perf_counter() - T0:7.1f} s] {what}", flush=True)


def bench_decode(family: Any, concurrency: int, prompt: int, new: int, bound: Any) -> dict[str, float]:
    """`bound(batch, context)`: a step's read bound in ms."""
    gen = torch.Generator().manual_seed(concurrency)
    ids = torch.randint(0, 150000, (concurrency, prompt), generator=gen)
    prefilled = []
    for start in range(0, concurrency, 8):
        prefilled += family.prefill_batch([(row.tolist(), []) for row in ids[start : start + 8]])
    need_mb = int(concurrency * (prompt + new + 32) * family.kv_layout().bytes_per_token() / 2**20) + 64
    phase(f"decode {concurrency}: ours, eager")

    async def twice(graphs: bool, run_ahead: bool = True) -> Any:  # one event loop: the batch's asyncio objects
        batch = new_batch(family, need_mb, graphs, run_ahead)
        await _decode_ours(batch, prefilled, new)  # warm-up; with graphs, records every bucket this run meets
        return await _decode_ours(batch, prefilled, new)

    eager, eager_gaps, eager_tokens = asyncio.run(twice(graphs=False))
    phase(f"decode {concurrency}: ours, CUDA graphs")
    seconds, gaps, tokens = asyncio.run(twice(graphs=True))
    phase(f"decode {concurrency}: ours, CUDA graphs, each step launched after the last one's tokens are read")
    in_turn, in_turn_gaps, in_turn_tokens = asyncio.run(twice(graphs=True, run_ahead=False))
    prefilled.clear()  # (their KV: device memory the baselines can use)
    phase(f"decode {concurrency}: transformers' generate")
    model = family.model
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}

    def one_at_a_time() -> None:
        with torch.inference_mode():
            row = ids[:1].to("cuda")
            model.generate(input_ids=row, attention_mask=torch.ones_like(row), **kwargs)

    def static_batch() -> None:
        with torch.inference_mode():
            rows = ids.to("cuda")
            model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), **kwargs)

    t_one = cuda_time(one_at_a_time, repeat=1)  # a server without batching: requests in turn
    t_static = cuda_time(static_batch, repeat=1)
    produced = concurrency * (new - 1)  # tokens after prefill's first
    step_ms = statistics.median(gaps) * 1e3 if gaps else float("nan")
    bound_ms = bound(concurrency, prompt + new // 2)
    return {
        "concurrency": concurrency,
        "read_bound_ms": bound_ms,
        "step_over_read_bound": step_ms / bound_ms,
        "graphs_give_eager_tokens": tokens == eager_tokens,
        "run_ahead_gives_in_turn_tokens": tokens == in_turn_tokens,
        "ours_without_run_ahead_tokens_per_s": produced / in_turn,
        "step_ms_median_without_run_ahead": statistics.median(in_turn_gaps) * 1e3 if in_turn_gaps else float("nan"),
        "ours_tokens_per_s": produced / seconds,
        "ours_without_graphs_tokens_per_s": produced / eager,
        "step_ms_median_without_graphs": statistics.median(eager_gaps) * 1e3 if eager_gaps else float("nan"),
        "naive_one_at_a_time_tokens_per_s": (new - 1) / t_one,
        "generate_static_batch_tokens_per_s": produced / t_static,
        "step_ms_median": step_ms,
    }


def replay_only_ms(family: Any, prompt: int) -> float:
    """The batch-1 step's graph alone (no host work between steps): kernel time, event-timed."""
    from epd.workers.engine.cuda_graphs import GraphedSteps
    from epd.workers.engine.kv_cache import PagedKVCache

    cache = PagedKVCache(family.kv_layout(), 256 * 2**20)
    steps = GraphedSteps(family, cache, 1)
    blocks = cache.reserve(prompt + 1)
    steps.step([1], [prompt], [blocks], [prompt])
    graph = next(iter(steps.graphs.values())).graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 64])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--encoder-only", action="store_true")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="a tiny random model and small images (a check that it runs)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("engine_gpu.py needs a CUDA device (or --device cpu --small)")
    if args.device == "cpu":
        if not args.small:
            raise SystemExit("--device cpu runs only with --small: the 7B shapes are for a GPU")
        args.encoder_only = True
    from epd.workers.engine.attention import triton_kernels
    from epd.workers.engine.checkpoint import Checkpoint
    from epd.workers.engine.qwen2_5_vl import Qwen25VL
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    phase("building the model")
    torch.manual_seed(0)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.small:
        from epd.tools.tiny_model import qwen2_5_vl_config

        config = qwen2_5_vl_config(400, 64, 2)
    else:
        from epd.tools.random_checkpoint import qwen2_5_vl_7b_config

        config = qwen2_5_vl_7b_config(args.layers)
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype)).eval()
    ckpt = Checkpoint(Path("."), config, None, Qwen2VLImageProcessorPil(), "")
    # ours, with a copy of the weights; images preprocessed by torch on the device (bench_encoder times both)
    family = Qwen25VL(ckpt, device=args.device, dtype=dtype, model=model, preprocess="torch")
    sizes = [(112, 4), (224, 2)] if args.small else [(448, 32), (1024, 8)]
    text_bytes = sum(
        p.numel() * p.element_size()
        for n, p in family.text.named_parameters()
        if "embed_tokens" not in n  # a step reads one embedding row
    )
    kv_token = family.kv_layout().bytes_per_token()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "model": "tiny random Qwen2.5-VL (--small)" if args.small else "Qwen2.5-VL-7B's shape, random weights",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "text_layers": args.layers,
        "attention": "triton paged" if triton_kernels() is not None else "torch (no triton kernels)",
        "language_weight_bytes_read_per_step": text_bytes,
        "kv_bytes_per_token": kv_token,
    }
    phase("encoder")
    results["encoder"] = [bench_encoder(family, side, n) for side, n in sizes]
    for e in results["encoder"]:
        phase(f"encoder: {e}")
    phase("encoder, image bytes to embeddings in the staging buffer")
    results["bytes_to_embedding"] = [bench_bytes_to_embedding(family, side, n) for side, n in sizes]
    for e in results["bytes_to_embedding"]:
        phase(f"bytes to embedding: {e}")
    if args.encoder_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(encoder_table(results))
        print(bytes_table(results))
        return 0
    phase("bandwidth")
    bw = bandwidth()
    results["bandwidth_gb_per_s"] = bw / 1e9
    results["weight_read_bound_ms"] = text_bytes / bw * 1e3

    def bound(batch: int, context: int) -> float:
        return (text_bytes + batch * context * kv_token) / bw * 1e3

    phase(f"{results['device']}: copy {bw / 1e9:.0f} GB/s; weight-read bound {results['weight_read_bound_ms']:.2f} ms")
    phase("prefill")
    results["prefill"] = bench_prefill(family, 8, 1024)
    phase(f"prefill: {results['prefill']}")
    results["decode"] = []
    for c in args.concurrency:
        results["decode"].append(bench_decode(family, c, args.prompt, args.new_tokens, bound))
        phase(f"decode: {results['decode'][-1]}")
    one = results["decode"][0]
    results["batch1_step_over_bound"] = one["step_ms_median"] / results["weight_read_bound_ms"]
    phase("batch-1 graph replay")
    results["batch1_graph_replay_ms"] = replay_only_ms(family, args.prompt + args.new_tokens // 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(bytes_table(results))
    return 0


def table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['device']}, torch {r['torch']}, {r['text_layers']} text layers, bf16, attention {r['attention']}",
        "| concurrency | step | read bound (weights + KV) | step / bound | tokens/s |",
        "|---|---|---|---|---|",
        *(
            f"| {d['concurrency']} | {d['step_ms_median']:.2f} ms | {d['read_bound_ms']:.2f} ms "
            f"| {d['step_over_read_bound']:.2f}x | {d['ours_tokens_per_s']:.0f} |"
            for d in r["decode"]
        ),
        f"copy bandwidth {r['bandwidth_gb_per_s']:.0f} GB/s; weight-read bound {r['weight_read_bound_ms']:.2f} ms/step",
        "| what | epd | naive | ratio |",
        "|---|---|---|---|",
    ]
    for e in r["encoder"]:
        side = f"{e['side']}x{e['side']}"
        lines.append(
            f"| encoder {side}, images/s (our tower packed; "
            f"with processor {e['encode_with_processor_images_per_s']:.1f}) "
            f"| {e['ours_packed_images_per_s']:.1f} | {e['naive_images_per_s']:.1f} "
            f"| {e['ours_packed_images_per_s'] / e['naive_images_per_s']:.2f}x |"
        )
    pf = r["prefill"]
    lines.append(
        f"| prefill tokens/s (8 x 1024) | {pf['ours_tokens_per_s']:.0f} | {pf['naive_tokens_per_s']:.0f} "
        f"| {pf['ours_tokens_per_s'] / pf['naive_tokens_per_s']:.2f}x |"
    )
    for d in r["decode"]:
        lines.append(
            f"| decode tokens/s at {d['concurrency']} "
            f"(static-batch generate {d['generate_static_batch_tokens_per_s']:.0f}; "
            f"ours without CUDA graphs {d['ours_without_graphs_tokens_per_s']:.0f}; "
            f"graphs without run-ahead {d['ours_without_run_ahead_tokens_per_s']:.0f}) "
            f"| {d['ours_tokens_per_s']:.0f} | {d['naive_one_at_a_time_tokens_per_s']:.0f} "
            f"| {d['ours_tokens_per_s'] / d['naive_one_at_a_time_tokens_per_s']:.2f}x |"
        )
    lines.append(
        f"batch-1 decode step {r['decode'][0]['step_ms_median']:.2f} ms "
        f"= {r['batch1_step_over_bound']:.2f}x the bound; "
        f"its graph alone {r['batch1_graph_replay_ms']:.2f} ms = "
        f"{r['batch1_graph_replay_ms'] / r['weight_read_bound_ms']:.2f}x"
    )
    return "\n".join(lines)


def encoder_table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['device']}, torch {r['torch']}, {r['model']}, vision tower, attention {r['attention']}",
        "| image | ours packed | ours one at a time | transformers packed | transformers one at a time "
        "| ours with processor | ours with torch preprocessing | ours vs theirs (rel. error) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in r["encoder"]:
        side = f"{e['side']}x{e['side']}"
        lines.append(
            f"| {side} x {e['images']} | {e['ours_packed_images_per_s']:.1f} "
            f"| {e['ours_one_at_a_time_images_per_s']:.1f} "
            f"| {e['packed_forward_images_per_s']:.1f} | {e['naive_images_per_s']:.1f} "
            f"| {e['encode_with_processor_images_per_s']:.1f} "
            f"| {e['encode_with_torch_preprocessing_images_per_s']:.1f} | {e['ours_vs_theirs_relative_error']:.1e} |"
        )
    return "\n".join(lines)


def bytes_table(r: dict[str, Any]) -> str:
    lines = [
        "image bytes (JPEG) -> embedding in the staging buffer, images/s",
        "| image | ours packed | ours one at a time | ours pipelined batcher | transformers packed "
        "| transformers one at a time | torch pixels = processor's (max abs diff) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in r["bytes_to_embedding"]:
        lines.append(
            f"| {e['side']}x{e['side']} x {e['images']} | {e['ours_packed_images_per_s']:.1f} "
            f"| {e['ours_one_at_a_time_images_per_s']:.1f} | {e['ours_pipelined_images_per_s']:.1f} "
            f"| {e['theirs_packed_images_per_s']:.1f} | {e['theirs_one_at_a_time_images_per_s']:.1f} "
            f"| {e['torch_pixels_equal_processor']} ({e['torch_pixels_max_abs_diff']:.2e}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
