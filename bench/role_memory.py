"""Resident memory of each worker role for one checkpoint: every role loads only what it runs.

Each role loads the model in a fresh process, as `epd worker ROLE` does, and reports its
resident set (VmRSS) after loading, less that of a process that imported the same
libraries and loaded nothing. The checkpoint is random, written in shards of 64 MB with an
index, as real checkpoints come.

    .venv/bin/python bench/role_memory.py [--hidden 1024] [--layers 8] [--vision-width 1024]

Prints a table and writes bench/results/role_memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "role_memory.json"

# (role, EPD_INLINE_ENCODE) -> what `epd worker ROLE` loads
CASES = [("none", "fallback"), ("encode", "fallback"), ("prefill", "off"), ("prefill", "fallback"), ("decode", "off")]

PROBE = """
import gc, sys
from epd.core.config import Settings
from epd.workers.engine import load_family
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.roles import weights_for
role, inline, path = sys.argv[1:4]
ckpt = Checkpoint.open(path)
family = None
if role != "none":
    family = load_family(ckpt, parts=weights_for(role, Settings(model=path, inline_encode=inline != "off")))
gc.collect()
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
print(rss * 1024)
"""


def rss_after_loading(role: str, inline: str, path: Path) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, role, inline, str(path)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return int(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    from epd.tools.tiny_model import build_tiny_qwen2_vl, reshard
    from safetensors import safe_open

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vision-width", type=int, default=1024)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        single = build_tiny_qwen2_vl(
            Path(tmp) / "single", hidden=args.hidden, layers=args.layers, vision_width=args.vision_width
        )
        sharded = reshard(single, Path(tmp) / "sharded", "64MB")
        shards = sorted(f.name for f in sharded.glob("model-*.safetensors"))
        weights = {"vision": 0, "language": 0}
        for shard in shards:
            with safe_open(sharded / shard, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    size = 4 * math.prod(f.get_slice(key).get_shape())  # float32
                    weights["vision" if key.startswith("visual.") else "language"] += size
        base = rss_after_loading("none", "fallback", sharded)
        rows = []
        for role, inline in CASES[1:]:
            rss = rss_after_loading(role, inline, sharded)
            rows.append({"role": role, "inline_encode": inline, "rss_bytes": rss, "over_base_bytes": rss - base})
    result = {
        "checkpoint": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vision_width": args.vision_width,
            "shards": len(shards),
            "weight_bytes": weights,
        },
        "base_rss_bytes": base,
        "roles": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    mb = 2**20
    print(
        f"float32 weights: vision tower {weights['vision'] / mb:.0f} MiB, language model "
        f"{weights['language'] / mb:.0f} MiB, in {len(shards)} shards; a process that loads nothing: "
        f"{base / mb:.0f} MiB"
    )
    print("| role | EPD_INLINE_ENCODE | resident MiB | over the empty process, MiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['role']} | {r['inline_encode']} | {r['rss_bytes'] / mb:.0f} | {r['over_base_bytes'] / mb:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
