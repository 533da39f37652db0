"""Overload's short version: 4x what the cluster serves for a while; the excess is refused with Retry-After,
nothing accepted is lost, and no process's memory grows past the bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def test_four_times_overload_refuses_with_retry_after_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    argv = [sys.executable, str(ROOT / "bench" / "overload.py"), "--seconds", "15", "--probe", "8"]
    run = subprocess.run(
        [*argv, "--max-inflight", "32", "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["achieved_factor"] >= 1.5, r["achieved_factor"]  # offered well past capacity (asked 4x: see BENCHMARKS)
    assert r["lost"] == 0, r["failures"]
    assert r["verdicts"].get("refused", 0) > 0, r["verdicts"]  # it was overloaded: the excess was turned away...
    assert r["verdicts"].get("refused without Retry-After", 0) == 0  # ...each refusal saying when to come back
    assert r["accepted"] == r["verdicts"]["ok"] > 0
    assert max(r["memory_growth_mib"].values()) <= r["memory_bound_mib"], r["memory_growth_mib"]
    assert run.returncode == 0
