"""Overload, CI-sized: a cluster offered 4x what it served, open loop; every response is a 200 with
transformers' `generate` answer or a 429/503 with Retry-After: none lost, none of any other kind.

No speed is asserted: the offered factor depends on the machine (bench/overload.py measures it). The gateway's
in-flight limit is 4, so the load is well past it whatever the machine: the refusals asserted are behaviour.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import MAX_NEW, png_bytes, start_cluster

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench():  # noqa: ANN201 - the script is no package
    sys.path.insert(0, str(BENCH))  # its own imports: chaos, http_load
    spec = importlib.util.spec_from_file_location("overload_bench", BENCH / "overload.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_overload_is_refused_with_retry_after_and_nothing_accepted_is_lost(tiny_model: Path, tmp_path: Path) -> None:
    bench = load_bench()
    chaos, http_load = bench.chaos, bench.http_load
    red, blue = png_bytes((64, 48), (255, 0, 0), "circle"), png_bytes((56, 72), (0, 0, 255), "square")
    distinct = [
        chaos.Spec(i, kind, question, image, MAX_NEW, stream, False)
        for i, (kind, question, image, stream) in enumerate(
            [
                ("text", "Say something.", None, False),
                ("text", "Say something else.", None, True),
                ("repeat", "What color is the shape?", red, False),
                ("repeat", "What shape is it?", blue, True),
            ]
        )
    ]
    cluster = start_cluster(tiny_model, tmp_path, "e-p-d", max_inflight=4)
    try:
        raws = bench.request_bytes(distinct, cluster.settings.model_name, cluster.settings.port)

        async def drive() -> tuple[dict, dict]:
            pool = http_load.Pool("127.0.0.1", cluster.settings.port)
            try:
                served = await bench.closed_loop(pool, raws, 4, 3.0)
                load = [raws[i % len(raws)] for i in range(2000)]
                return served, await bench.open_loop(pool, load, 4 * max(served["rps"], 1.0), 6.0, seed=0)
            finally:
                pool.close()

        served, offered = asyncio.run(drive())
    finally:
        cluster.stop()
    assert served["completed"] > 0 and served["other"] == 0, served  # 4 clients, 4 slots: nobody refused
    answers = offered["answers"]
    specs = [distinct[i % len(distinct)] for i in range(len(answers))]
    outcomes = [bench.read_answer(s, a) for s, a in zip(specs, answers, strict=True)]
    checked = bench.judge(specs, outcomes, tiny_model, most=len(distinct))  # every answer against generate
    verdicts = {v: sum(o.verdict == v for o in outcomes) for v in {o.verdict for o in outcomes}}
    failures = [(o.verdict, o.status, o.error) for o in outcomes if o.verdict not in ("ok", "refused")][:5]
    assert set(verdicts) <= {"ok", "refused"}, (verdicts, failures)  # no loss, no other status, no wrong answer
    assert verdicts.get("ok", 0) > 0 and verdicts.get("refused", 0) > 0, verdicts
    assert checked == verdicts["ok"]
    assert all(a.status in (200, 429, 503) for a in answers)
    assert all(a.retry_after and int(a.retry_after) > 0 for a in answers if a.status != 200)
