"""`epd up`: NATS, Mooncake master, a gateway and the workers of a topology, on one machine, supervised.

Every child dies with this process (PR_SET_PDEATHSIG) and is stopped on exit or Ctrl-C. A child that
exits on its own (a crash, a kill -9, an out-of-memory kill) is started again after a backoff, and
the others keep serving meanwhile: the NATS server on its port with its JetStream store (queued jobs
survive it), the Mooncake master on its ports, a worker or the gateway with the same settings. The
restarts are logged, counted in `epd_restarts_total` (the supervisor's own metrics endpoint) and
written to `supervisor.json` in the workdir, which `epd status` shows.
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

from epd.core.config import TOPOLOGY_ROLES, Settings
from epd.core.metrics import serve_metrics
from epd.ops.infra import MooncakeMaster, NatsServer
from epd.ops.nats_cluster import NatsCluster
from epd.ops.processes import free_port, log_tail, spawn, stop, wait_until
from epd.ops.supervisor import STATE_FILE, Supervisor

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
    supervisor: Supervisor | None = None  # set by `supervise()`: children that exit are started again

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
            try:
                wait_until(self._ready, gateway_timeout_s, "gateway and workers", self.procs["gateway"])
            except RuntimeError as e:  # say why: the end of each exited process's log
                raise RuntimeError(f"{e}{self._exit_logs()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, role: str, index: int) -> subprocess.Popen:
        name = f"{role}-{index}"
        self.procs[name] = self._spawn(["worker", role], name)
        if self.supervisor is not None:
            self._watch(name, role)
        return self.procs[name]

    def supervise(self, metrics: bool = True) -> Supervisor:
        """From now on, restart any child that exits (call `self.supervisor.tick()` about once a second).

        `metrics`: serve `epd_restarts_total` on a free port (its URL goes to the state file)."""
        self.supervisor = sup = Supervisor(self.workdir / STATE_FILE)
        servers = self.nats.nodes if isinstance(self.nats, NatsCluster) else [self.nats] if self.nats else []
        for i, server in enumerate(servers):  # (each node of a NATS cluster on its own port and store)
            self._watch_infra("nats" if len(servers) == 1 else f"nats-{i}", "nats", server)
        if self.master is not None:
            self._watch_infra("mooncake-master", "mooncake-master", self.master)
        for name in self.procs:
            self._watch(name, "gateway" if name == "gateway" else name.rsplit("-", 1)[0])
        if metrics and self.settings.metrics_port >= 0:
            sup.metrics_url = serve_metrics(self.settings.bind_host, 0, self.settings.reachable_host)
        sup.write()
        return sup

    def _watch_infra(self, name: str, kind: str, infra: NatsServer | MooncakeMaster) -> None:
        assert self.supervisor is not None
        self.supervisor.watch(name, kind, lambda: infra.proc, infra.launch)

    def _watch(self, name: str, kind: str) -> None:
        assert self.supervisor is not None
        args = ["gateway"] if name == "gateway" else ["worker", kind]

        def restart() -> subprocess.Popen:
            self.procs[name] = self._spawn(args, name)
            return self.procs[name]

        self.supervisor.watch(name, kind, lambda: self.procs.get(name), restart)

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

    def _exit_logs(self, lines: int = 12) -> str:
        out = ""
        for name in self.dead():
            if tail := log_tail(self.workdir / "logs" / f"{name}.log", lines):
                out += f"\n--- the end of {name}'s log:\n{tail}"
        return out

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        self.supervisor = None  # nothing is started again from here on
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
        supervisor = cluster.supervise()
        print(f"epd up: {settings.topology} serving {settings.model_name!r} at {cluster.base_url}/v1", flush=True)
        print(f"  logs in {workdir / 'logs'}, traces in {settings.trace_dir}; Ctrl-C stops everything", flush=True)
        print(f"  a process that exits is started again; restarts: `epd status`, {supervisor.metrics_url}", flush=True)
        while not done.wait(0.5):
            supervisor.tick()  # (it logs each exit and restart)
        return 0
    finally:
        cluster.stop()
