"""Connector benchmark: what moving embeddings and KV costs, against a plain loopback TCP socket.

Run: `.venv/bin/python bench/connectors.py` (a NATS server and a Mooncake master of its own,
on loopback; writes `bench/results/connectors.json`).

- The link: one TCP socket on loopback copying the same bytes from one buffer into another
  (`sendall` / `recv_into`), measured in the same run. Every figure is compared with it.
- EC: save and load of one embedding of 1,024 x 3,584 bfloat16 (Qwen2.5-VL-7B's hidden size):
  Mooncake Store, saved by one client and loaded by another (as an encoder and a prefill
  worker), one at a time and in batches of 4; and the shared directory.
- KV: 28 layers x 2 x 4 heads x 1,024 tokens x 128 dims of bfloat16 (56 MiB) from one
  TransferEngine into another's registered buffer, whole and as the direct path sends it
  (28 layer writes); the store path (put, then get by another client) beside it.
- Layer-wise against whole-KV: a prefill of 1,024 tokens through a 28-layer model with that KV
  shape (hidden 512, so that it runs on a CPU), until the KV is in the decoder's buffer. Layer-wise
  writes each layer as the forward computes it; whole-KV writes it all after the forward. Hidden
  share = (whole - layer-wise) / (whole - forward alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parent / "results" / "connectors.json"
EMBEDDING = (1024, 3584)
KV = (28, 2, 4, 1024, 128)


class SocketLink:
    """The link limit: one loopback TCP connection copying bytes into a preallocated buffer."""

    def __init__(self, max_bytes: int) -> None:
        self.src = bytearray(os.urandom(1 << 20)) * (max_bytes >> 20) + bytearray(max_bytes % (1 << 20))
        self.dst = bytearray(max_bytes)
        self.server = socket.create_server(("127.0.0.1", 0))

    def copy_s(self, nbytes: int) -> float:
        """Seconds from the first byte sent to the last one in `dst`."""

        def receive() -> None:
            conn, _ = self.server.accept()
            view, got = memoryview(self.dst), 0
            while got < nbytes:
                got += conn.recv_into(view[got:], nbytes - got)
            conn.close()

        t = threading.Thread(target=receive)
        t.start()
        client = socket.create_connection(self.server.getsockname())
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        client.sendall(memoryview(self.src)[:nbytes])
        t.join()
        elapsed = time.perf_counter() - started
        client.close()
        assert self.dst[:nbytes] == self.src[:nbytes]
        return elapsed


class Table:
    """Rows of (operation, the socket's copy of the same bytes), measured in alternation."""

    def __init__(self, link: SocketLink, repeat: int) -> None:
        self.link, self.repeat, self.rows = link, repeat, []

    async def measure(self, name: str, nbytes: int, op: Any) -> None:
        """`op(i)` (sync or async) moves `nbytes`; each round times it and then the socket. `op(-1)` warms up."""
        ops, socks = [], []
        for i in range(-1, self.repeat):  # round -1 warms up (first touches of fresh memory, connections)
            started = time.perf_counter()
            result = op(i)
            if asyncio.iscoroutine(result):
                await result
            ops.append(time.perf_counter() - started)
            socks.append(self.link.copy_s(nbytes))
        ops, socks = ops[1:], socks[1:]
        self.add(name, nbytes, statistics.median(ops), statistics.median(socks))

    def add(self, name: str, nbytes: int, op_s: float, socket_s: float) -> None:
        row = {
            "what": name,
            "bytes": nbytes,
            "ms": round(op_s * 1e3, 3),
            "gb_per_s": round(nbytes / op_s / 1e9, 3),
            "socket_ms": round(socket_s * 1e3, 3),
            "socket_gb_per_s": round(nbytes / socket_s / 1e9, 3),
            "of_socket": round(socket_s / op_s, 3),
        }
        self.rows.append(row)
        print(
            f"{name:52s} {nbytes / 2**20:6.2f} MiB {row['ms']:8.2f} ms {row['gb_per_s']:5.2f} GB/s | socket "
            f"{row['socket_gb_per_s']:5.2f} GB/s | {row['of_socket'] * 100:4.0f} %",
            flush=True,
        )


async def bench_ec(settings: Any, table: Table) -> None:
    from epd.connectors.ec_mooncake import KEY_PREFIX, MooncakeECConnector
    from epd.connectors.ec_shared_dir import SharedDirECConnector
    from epd.connectors.mooncake_store import MooncakeStore

    embedding = torch.randn(EMBEDDING, dtype=torch.bfloat16)
    nbytes, grid = embedding.numel() * 2, [1, 64, 64]
    saver, loader = MooncakeStore(settings), MooncakeStore(settings)  # an encoder's client, a prefill worker's
    encoder, prefill = MooncakeECConnector(saver), MooncakeECConnector(loader)

    async def drop(keys: list[str]) -> None:
        for k in keys:
            for _ in range(40):  # (a read pins a key for the lease TTL)
                if await saver.remove(KEY_PREFIX + k):
                    break
                await asyncio.sleep(0.05)

    try:
        keys = [f"bench-{i}" for i in range(table.repeat)]
        await table.measure("EC save, Mooncake Store", nbytes, lambda i: encoder.save(keys[i], embedding, grid))
        await table.measure("EC load, Mooncake Store, another client", nbytes, lambda i: prefill.load(keys[i]))
        got = await prefill.load(keys[0])
        assert got is not None and torch.equal(got[0], embedding)
        await drop(keys)
        batch = [[f"bench-b{i}-{j}" for j in range(4)] for i in range(table.repeat)]
        await table.measure(
            "EC save_many of 4, Mooncake Store",
            4 * nbytes,
            lambda i: encoder.save_many([(k, embedding, grid) for k in batch[i]]),
        )
        await table.measure(
            "EC load_many of 4, Mooncake Store, another client", 4 * nbytes, lambda i: prefill.load_many(batch[i])
        )
        await drop([k for b in batch for k in b])
    finally:
        saver.close()
        loader.close()
    with tempfile.TemporaryDirectory() as d:
        shared = SharedDirECConnector(Path(d), 1 << 30)
        await table.measure("EC save, shared directory", nbytes, lambda i: shared.save(f"b-{i}", embedding, grid))
        await table.measure("EC load, shared directory", nbytes, lambda i: shared.load(f"b-{i}"))


async def bench_kv(settings: Any, table: Table) -> None:
    from epd.connectors.kv_mooncake import MooncakeStoreKVConnector
    from epd.connectors.mooncake_store import MooncakeStore
    from epd.connectors.transfer_engine import TransferLink

    kv = torch.randn(KV, dtype=torch.bfloat16)
    nbytes, layer = kv.numel() * 2, kv.numel() * 2 // KV[0]
    a, b = TransferLink(settings, 128), TransferLink(settings, 128)  # a prefill worker's, a decoder's
    a.view(0, nbytes).copy_(kv.view(-1).view(torch.uint8))

    def write(size: int) -> None:
        a.wait([a.write(b.session, 0, b.base, size)], 30)

    def layerwise(_: int) -> None:
        a.wait([a.write(b.session, i * layer, b.base + i * layer, layer) for i in range(KV[0])], 30)

    await table.measure("KV, TransferEngine, one write", nbytes, lambda _: write(nbytes))
    await table.measure("KV, TransferEngine, 28 layer writes", nbytes, layerwise)
    assert torch.equal(b.view(0, nbytes), a.view(0, nbytes))
    for size in (1 << 20, 4 << 20, 16 << 20):
        await table.measure(f"TransferEngine, one write of {size >> 20} MiB", size, lambda _, n=size: write(n))
    p, d = MooncakeStore(settings), MooncakeStore(settings)
    sender, receiver = MooncakeStoreKVConnector(p), MooncakeStoreKVConnector(d)

    async def through_store(i: int) -> None:
        handle = await sender.send(f"bench-{i}", kv)
        assert torch.equal(await receiver.recv(handle), kv)
        await receiver.release(handle)

    try:
        await table.measure("KV, Mooncake Store (put, get by another client)", nbytes, through_store)
        await asyncio.sleep(1.0)  # the releases remove after the read lease
    finally:
        p.close()
        d.close()


def layerwise_model(device: str) -> Any:
    """A Qwen2.5-VL family with the KV shape above: Qwen2.5-VL-7B's text model on a GPU; on a CPU, hidden 512
    (4 heads of 128), so that a 1,024-token forward takes about a second."""
    from epd.tools.random_checkpoint import qwen2_5_vl_7b_config
    from epd.workers.engine.checkpoint import Checkpoint
    from epd.workers.engine.qwen2_5_vl import Qwen25VL
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = qwen2_5_vl_7b_config(KV[0])
    if device == "cpu":
        text = config.text_config
        text.hidden_size, text.intermediate_size, text.num_attention_heads = 512, 2048, 4
        text.vocab_size = 1024
        vision = config.vision_config
        vision.out_hidden_size, vision.depth, vision.fullatt_block_indexes = 512, 1, [0]  # (it does not run)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).eval()
    ckpt = Checkpoint(Path("."), config, None, Qwen2VLImageProcessorPil(), "")
    return Qwen25VL(ckpt, device=device, dtype="bfloat16", model=model)


async def bench_layerwise(settings: Any, repeat: int, device: str, threads: int) -> dict[str, Any]:
    """Prefill until the KV is in the decoder's buffer, layer-wise and whole, with `threads` torch threads."""
    from epd.connectors.kv_direct import KVLanding, LayerWriter
    from epd.connectors.transfer_engine import TransferLink
    from epd.schemas.decode import KVReserve

    family = layerwise_model(device)
    layers, kv_heads, tokens, head_dim = KV[0], KV[2], KV[3], KV[4]
    shape = (layers, 2, kv_heads, tokens, head_dim)
    nbytes = math.prod(shape) * 2
    ids = torch.randint(0, 1000, (tokens,)).tolist()
    landing = KVLanding(TransferLink(settings, 128), ttl_s=60)
    prefill = TransferLink(settings, 128)

    def forward(sinks: list | None = None) -> list:
        out = family.prefill_batch([(ids, [])], sinks)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    async def forward_only() -> float:
        started = time.perf_counter()
        await asyncio.to_thread(forward)
        return time.perf_counter() - started

    async def through(layerwise: bool) -> float:
        grant = landing.reserve(KVReserve(request_id="r", nbytes=nbytes))  # (the NATS request is left out)
        offset = prefill.arena.alloc(nbytes)
        writer = LayerWriter(prefill, None, "bench-decoder", grant, offset, shape, torch.bfloat16)
        started = time.perf_counter()
        out = await asyncio.to_thread(forward, [writer] if layerwise else None)
        if not layerwise:  # the whole KV once the forward is done: the same writes, none overlapped
            view = out[0].view
            for i in range(layers):
                writer.write_layer(i, view.keys[i][0], view.values[i][0])
        handle = await writer.finish()
        elapsed = time.perf_counter() - started
        assert torch.equal(landing.take(handle.tensor), out[0].kv.cpu())
        return elapsed

    torch.set_num_threads(threads)
    try:
        await forward_only()  # warm up
        runs: dict[str, list[float]] = {"forward": [], "layerwise": [], "whole": []}
        for _ in range(repeat):  # interleaved, so drift hits all three alike
            runs["forward"].append(await forward_only())
            runs["layerwise"].append(await through(True))
            runs["whole"].append(await through(False))
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    med = {k: statistics.median(v) for k, v in runs.items()}
    transfer = med["whole"] - med["forward"]
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model_hidden": family.text.config.hidden_size,
        "torch_threads": threads,
        "tokens": tokens,
        "layers": layers,
        "kv_bytes": nbytes,
        "forward_ms": round(med["forward"] * 1e3, 1),
        "layerwise_ms": round(med["layerwise"] * 1e3, 1),
        "whole_ms": round(med["whole"] * 1e3, 1),
        "transfer_after_forward_ms": round(transfer * 1e3, 1),
        "hidden_share": round((med["whole"] - med["layerwise"]) / transfer, 3) if transfer > 0 else None,
        "runs_ms": {k: [round(x * 1e3, 1) for x in v] for k, v in runs.items()},
    }
    print(
        f"{result['device']}, {threads} torch threads, {tokens} tokens until the KV is at the decoder: "
        f"forward {result['forward_ms']} ms, layer-wise {result['layerwise_ms']} ms, whole-KV {result['whole_ms']} ms; "
        f"hidden share of the transfer {result['hidden_share']}",
        flush=True,
    )
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from epd.core.config import Settings, export_mooncake_env
    from epd.ops.infra import MooncakeMaster

    master = MooncakeMaster(Path(tempfile.mkdtemp(prefix="epd-bench-"))).start()
    try:
        settings = Settings(
            mooncake_master=master.master_address, mooncake_metadata=master.metadata_url, mooncake_segment_mb=512
        )
        export_mooncake_env(settings)
        table = Table(SocketLink(4 * math.prod(EMBEDDING) * 2 + math.prod(KV) * 2), args.repeat)
        await bench_ec(settings, table)
        await bench_kv(settings, table)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cores = os.cpu_count() or 1
        layerwise = [await bench_layerwise(settings, args.layer_repeat, device, t) for t in sorted({cores, 1})]
    finally:
        master.stop()
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__,
        "command": "python bench/connectors.py",
        "transfers": table.rows,
        "layerwise_vs_whole": layerwise,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--layer-repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    results = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
