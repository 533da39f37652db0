"""`epd up` supervises what it started: a worker, the gateway or NATS killed with SIGKILL comes back, the
restart is counted and shown, the rest keeps serving; Ctrl-C still stops everything. While NATS is away,
the gateway answers a retryable 503 in OpenAI's shape and `/ready` names it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from epd.ops.processes import free_port, spawn, wait_until
from epd.ops.supervisor import STATE_FILE

from .conftest import chat_body, start_cluster
from .oracle import reference

pytestmark = pytest.mark.e2e


def _state(workdir: Path) -> dict:
    return json.loads((workdir / STATE_FILE).read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: it only waits for its parent to read its status
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_restarted(workdir: Path, name: str, restarts: int, timeout_s: float = 60) -> dict:
    def done() -> bool:
        p = _state(workdir)["processes"][name]
        return p["restarts"] >= restarts and p["state"] == "running"

    wait_until(done, timeout_s, f"{name} started again")
    return _state(workdir)["processes"][name]


def _ask(base_url: str, question: str) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", json=chat_body(question), timeout=120)


def test_epd_up_restarts_what_dies_and_ctrl_c_still_stops_everything(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "epd.ops.cli", "up", "--model", str(tiny_model), "--port", str(port)]
    argv += ["--workdir", str(tmp_path), "--decoders", "2"]
    log = tmp_path / "up.log"
    proc = spawn(argv, log, env={**os.environ, "EPD_MOONCAKE_SEGMENT_MB": "32"})
    pids: set[int] = set()
    try:
        wait_until(lambda: "serving" in log.read_text(), 240, "epd up", proc)
        expected = reference(tiny_model, "Hello there.", None, 12)[1]
        assert _ask(base_url, "Hello there.").json()["choices"][0]["message"]["content"] == expected
        state = _state(tmp_path)
        assert set(state["processes"]) == {"nats", "mooncake-master", "gateway", "encode-0", "prefill-0"} | {
            "decode-0",
            "decode-1",
        }
        pids |= {p["pid"] for p in state["processes"].values()}

        for name in ("decode-0", "gateway", "nats"):
            os.kill(state["processes"][name]["pid"], signal.SIGKILL)
            again = _wait_restarted(tmp_path, name, 1)
            assert again["last_exit_code"] == -signal.SIGKILL and again["pid"] != state["processes"][name]["pid"]
            pids.add(again["pid"])
            # the rest served on; after the restart, every request is answered again (the gateway, once it is
            # up, or requests once the workers reconnected to NATS)
            wait_until(lambda: _ready(base_url), 120, f"ready after {name} restarted")
            assert _ask(base_url, "Hello there.").json()["choices"][0]["message"]["content"] == expected

        # counted in the supervisor's metrics and shown by `epd status`
        with urllib.request.urlopen(_state(tmp_path)["metrics_url"], timeout=5) as r:
            text = r.read().decode()
        assert 'epd_restarts_total{kind="decode",process="decode-0"} 1.0' in text
        assert 'epd_restarts_total{kind="nats",process="nats"} 1.0' in text
        status = subprocess.run(
            [sys.executable, "-m", "epd.ops.cli", "status", "--workdir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        line = next(ln for ln in status.stdout.splitlines() if ln.startswith("decode-0 "))
        assert line.split()[4] == "1"  # restarts
        pids |= {p["pid"] for p in _state(tmp_path)["processes"].values()}
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        started = time.monotonic()
        proc.wait(timeout=30)
    assert time.monotonic() - started < 15
    assert proc.returncode == 0
    wait_until(lambda: not any(_alive(p) for p in pids), 5, "every child gone")


def _ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


async def test_with_nats_away_requests_get_a_retryable_503_and_ready_names_it(tiny_model: Path, tmp_path: Path) -> None:
    """No supervisor here: NATS stays down until the test starts it again, on its port with its store."""
    cluster = start_cluster(tiny_model, tmp_path, "e-p-d")
    try:
        assert cluster.nats is not None and cluster.nats.proc is not None
        cluster.nats.proc.kill()
        cluster.nats.proc.wait()
        async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as http:
            for _ in range(50):  # the gateway notices the closed socket at once; a second at most
                ready = await http.get("/ready")
                if "nats" in ready.json().get("down", []):
                    break
                await asyncio.sleep(0.1)
            assert ready.status_code == 503 and ready.json()["down"][0] == "nats", ready.json()
            r = await http.post("/v1/chat/completions", json=chat_body("Hello there."))
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "2"
            assert set(r.json()["error"]) >= {"message", "type", "code"}
            assert r.json()["error"]["code"] == "nats_unavailable"

            cluster.nats.launch()
            for _ in range(200):
                if (await http.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            r = await http.post("/v1/chat/completions", json=chat_body("Hello there."))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == reference(tiny_model, "Hello there.", None, 12)[1]
    finally:
        cluster.stop()


def test_a_cluster_that_cannot_start_says_why_from_the_logs(tmp_path: Path) -> None:
    from epd.ops.up import Cluster

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(RuntimeError, match="before") as raised:
        Cluster.local(not_a_model, tmp_path / "wd", "epd", gateway_timeout_s=60)
    assert "the end of gateway's log" in str(raised.value)
    assert "not-a-model/config.json" in str(raised.value)  # the cause, not only an exit code
