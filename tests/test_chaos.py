"""The chaos soak's short version: every kind of fault at least once under load, nothing lost or repeated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def test_short_chaos_soak_loses_and_repeats_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    argv = [sys.executable, str(ROOT / "bench" / "chaos.py"), "--short", "--requests", "120", "--clients", "6"]
    run = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=1500)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    v = result["verdicts"]
    assert (v["lost"], v["duplicated"], v["missing"]) == (0, 0, 0), result["failures"]
    assert v["ok"] >= 0.8 * result["requests"], v  # the rest: cancelled by their client, or a retryable error
    for kind, f in result["faults"].items():
        assert f["faults"] >= 1 and f["recovered"] == f["faults"], (kind, f)
    assert run.returncode == 0
