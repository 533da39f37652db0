"""Restart what `epd up` started when it exits: with backoff, logged, counted, and written down for `epd status`.

A child that dies is started again after `backoff` seconds; each quick death doubles the wait (up to
`BACKOFF_MAX_S`), and a child that stayed up `STABLE_S` starts from the shortest wait again, so a crash
loop costs little and a rare crash recovers at once.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from epd.core import metrics

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # up this long: the next death is a new incident, restarted after the shortest wait
STATE_FILE = "supervisor.json"


@dataclass
class ChildState:
    """One supervised process, as `epd status` shows it."""

    kind: str  # nats | mooncake-master | gateway | a worker role
    pid: int
    state: str = "running"  # running | restarting
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_at: float | None = None
    started_at: float = field(default_factory=time.time)


@dataclass
class _Child:
    kind: str
    proc: Callable[[], subprocess.Popen | None]  # the live process object (it changes on restart)
    restart: Callable[[], subprocess.Popen]
    state: ChildState
    backoff_s: float = BACKOFF_MIN_S
    due: float | None = None  # dead: when it starts again (monotonic)
    up_since: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        self.metrics_url = ""
        self._children: dict[str, _Child] = {}

    def watch(
        self,
        name: str,
        kind: str,
        proc: Callable[[], subprocess.Popen | None],
        restart: Callable[[], subprocess.Popen],
    ) -> None:
        """Supervise `name`: `proc()` is its current process, `restart()` starts it again and returns it."""
        p = proc()
        self._children[name] = _Child(kind, proc, restart, ChildState(kind=kind, pid=p.pid if p else 0))

    def forget(self, name: str) -> None:
        self._children.pop(name, None)

    def restarts(self) -> dict[str, int]:
        return {name: c.state.restarts for name, c in self._children.items()}

    def tick(self, now: float | None = None) -> list[str]:
        """Notice exits and start what is due; returns the names started again. Call it about once a second."""
        now = time.monotonic() if now is None else now
        started, changed = [], False
        for name, c in self._children.items():
            p = c.proc()
            if p is not None and p.poll() is None:
                if now - c.up_since > STABLE_S:
                    c.backoff_s = BACKOFF_MIN_S
                continue
            if c.due is None:  # just noticed
                code = p.returncode if p is not None else None
                c.due = now + c.backoff_s
                c.state.state, c.state.last_exit_code, c.state.last_exit_at = "restarting", code, time.time()
                log.warning(
                    "%s (pid %s) exited with code %s; starting it again in %.1fs", name, c.state.pid, code, c.backoff_s
                )
                changed = True
            if now < c.due:
                continue
            try:
                fresh = c.restart()
            except OSError as e:  # (a binary gone, a full disk): try again later
                log.error("could not start %s again: %s", name, e)
                c.due, c.backoff_s = now + c.backoff_s, min(2 * c.backoff_s, BACKOFF_MAX_S)
                continue
            c.due, c.up_since, c.backoff_s = None, now, min(2 * c.backoff_s, BACKOFF_MAX_S)
            c.state.state, c.state.pid, c.state.started_at = "running", fresh.pid, time.time()
            c.state.restarts += 1
            metrics.RESTARTS.labels(name, c.kind).inc()
            log.warning("%s started again (pid %d, restart %d)", name, fresh.pid, c.state.restarts)
            started.append(name)
            changed = True
        if changed:
            self.write()
        return started

    def write(self) -> None:
        """The state for `epd status`, replaced atomically."""
        state = {
            "metrics_url": self.metrics_url,
            "processes": {name: asdict(c.state) for name, c in self._children.items()},
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.state_file)


def read_state(workdir: Path) -> dict | None:
    """What the supervisor of `epd up` in `workdir` last wrote, or None."""
    try:
        return json.loads((workdir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def render_processes(state: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"{'process':<18} {'kind':<16} {'pid':>8} {'state':<11} {'restarts':>8}  last exit"]
    for name, p in sorted(state.get("processes", {}).items()):
        last = "-"
        if p.get("last_exit_at"):
            last = f"code {p['last_exit_code']}, {now - p['last_exit_at']:.0f}s ago"
        lines.append(f"{name:<18} {p['kind']:<16} {p['pid']:>8} {p['state']:<11} {p['restarts']:>8}  {last}")
    if state.get("metrics_url"):
        lines.append(f"(epd up's supervisor; restarts counted at {state['metrics_url']})")
    return "\n".join(lines)
