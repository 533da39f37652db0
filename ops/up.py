"""`epd up`: NATS, Mooncake master, a gateway and the workers of a topology, on one machine.

Every child dies with this process (PR_SET_PDEATHSIG) and is stopped on exit or Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from epd.ops.config import TOPOLOGY_ROLES, Settings
from epd.ops.infra import MooncakeMaster, NatsServer
from epd.ops.nats_cluster import NatsCluster
from epd.ops.processes import free_port, spawn, stop, wait_until

log = logging.getLogger(__name__)

ENDPOINTS_FILE = "endpoints.json"


@dataclass
class Cluster:
    """Everything `epd up` started; `stop()` takes it all down."""

    settings: Settings
    workdir: Path
    nats: NatsServer | NatsCluster | None = None
    master: MooncakeMaster | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def local(
        cls,
        model: Path,
        workdir: Path,
        topology: str = "e-p-d",
        counts: dict[str, int] | None = None,
        gateway_timeout_s: float = 180.0,
        **overrides: object,
    ) -> Cluster:
        """Start a whole topology as `epd up` does, with its own NATS server and Mooncake master and the
        gateway on a free port, spans under `workdir/traces` (tests, benchmarks); `overrides`: settings."""
        fields: dict = {
            "model": model,
            "topology": topology,
            "port": free_port(),
            "trace_dir": str(workdir / "traces"),
            "nats_url": "",
            "mooncake_master": "",
            "mooncake_metadata": "",
        }
        return cls(Settings(**(fields | overrides)), workdir).start(counts, gateway_timeout_s)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def start(self, counts: dict[str, int] | None = None, gateway_timeout_s: float = 120.0) -> Cluster:
        s = self.settings
        try:
            if not s.nats_url and s.nats_cluster > 1:
                self.nats = NatsCluster(self.workdir / "nats", s.nats_cluster).start()
                s = s.replace(nats_url=self.nats.url, nats_replicas=max(s.nats_replicas, self.nats.replicas))
            elif not s.nats_url:
                self.nats = NatsServer(self.workdir / "nats").start()
                s = s.replace(nats_url=self.nats.url)
            if not s.mooncake_master and s.topology != "epd":
                self.master = MooncakeMaster(self.workdir / "mooncake").start()
                s = s.replace(mooncake_master=self.master.master_address, mooncake_metadata=self.master.metadata_url)
            self.settings = s
            for role in TOPOLOGY_ROLES[s.topology]:
                for i in range((counts or {}).get(role, 1)):
                    self.add_worker(role, i)
            self.procs["gateway"] = self._spawn(["gateway"], "gateway")
            self._write_endpoints()
            wait_until(self._ready, gateway_timeout_s, "gateway and workers", self.procs["gateway"])
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, role: str, index: int) -> subprocess.Popen:
        name = f"{role}-{index}"
        self.procs[name] = self._spawn(["worker", role], name)
        return self.procs[name]

    @property
    def cli_argv(self) -> list[str]:
        """How this cluster runs `epd`: the same interpreter, as a module."""
        return [sys.executable, "-m", "epd.ops.cli"]

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        argv = [*self.cli_argv, *args]
        return spawn(argv, self.workdir / "logs" / f"{name}.log", env=self.settings.env())

    @property
    def endpoints_file(self) -> Path:
        """Where `epd status` and `epd trace` find this cluster's NATS and trace directory."""
        return self.workdir / ENDPOINTS_FILE

    def _write_endpoints(self) -> None:
        s = self.settings
        info = {"gateway": self.base_url, "nats_url": s.nats_url, "trace_dir": s.trace_dir, "topology": s.topology}
        self.endpoints_file.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def _ready(self) -> bool:
        """The gateway's /ready, and every worker started here alive in the pool."""
        if dead := self.dead():
            raise RuntimeError(f"{', '.join(dead)} exited before the cluster was ready (see {self.workdir / 'logs'})")
        try:
            with urllib.request.urlopen(self.base_url + "/ready", timeout=1) as r:
                live = json.loads(r.read())["workers"]
        except OSError:  # includes 503: not ready
            return False
        started = [name.rsplit("-", 1)[0] for name in self.procs if name != "gateway"]
        return all(live.get(role, 0) >= started.count(role) for role in set(started))

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        stop(list(self.procs.values()))
        self.procs.clear()
        try:  # only ours: another `epd up` may have taken the workdir since
            if json.loads(self.endpoints_file.read_text(encoding="utf-8"))["nats_url"] == self.settings.nats_url:
                self.endpoints_file.unlink()
        except (OSError, ValueError, KeyError):
            pass
        for infra in (self.master, self.nats):
            if infra is not None:
                infra.stop()


def run_up(settings: Settings, workdir: Path, counts: dict[str, int]) -> int:
    cluster = Cluster(settings, workdir)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        cluster.start(counts)
        print(f"epd up: {settings.topology} serving {settings.model_name!r} at {cluster.base_url}/v1", flush=True)
        print(f"  logs in {workdir / 'logs'}, traces in {settings.trace_dir}; Ctrl-C stops everything", flush=True)
        while not done.wait(1.0):
            if dead := cluster.dead():
                print(f"epd up: {', '.join(dead)} exited; stopping (see {workdir / 'logs'})", file=sys.stderr)
                return 1
        return 0
    finally:
        cluster.stop()
