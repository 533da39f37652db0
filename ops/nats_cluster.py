"""An embedded JetStream cluster on one machine (`epd up --nats-cluster 3`): N nats-servers routed to each other.

Each node has its own client, cluster and monitoring port on `host` and its own store; JetStream replicates
every stream and bucket created with `EPD_NATS_REPLICAS` (RAFT: R3 keeps serving with one node lost).
Clients get every node's URL, comma-separated, and move to another node when theirs goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from epd.ops.infra import NatsSecurity, NatsServer
from epd.ops.processes import free_port, wait_until


def cluster_nodes(
    workdir: Path, hosts: list[str], ports: tuple[int, int, int] | None = None, security: NatsSecurity | None = None
) -> list[NatsServer]:
    """One node per entry of `hosts` (repeat an address for several nodes on one machine), routed to each other.

    `ports` (client, cluster, monitoring) fixes the ports on every node (one node per address); None picks free
    ones on this machine.
    """
    nodes = []
    for i, host in enumerate(hosts, 1):
        client, route, monitor = ports or (free_port(host), free_port(host), free_port(host))
        nodes.append(NatsServer(workdir / f"n{i}", host, client, monitor, f"epd-n{i}", route, (), security))
    for node in nodes:
        node.routes = [f"{o.host}:{o.cluster_port}" for o in nodes if o is not node]
    return nodes


def servers_url(nodes: list[NatsServer]) -> str:
    """EPD_NATS_URL for clients of the cluster: every node, comma-separated."""
    return ",".join(n.url for n in nodes)


@dataclass
class NatsCluster:
    """`size` nodes on this machine's `host`; `url` lists them all."""

    workdir: Path
    size: int = 3
    host: str = "127.0.0.1"
    security: NatsSecurity | None = None
    nodes: list[NatsServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return servers_url(self.nodes)

    @property
    def replicas(self) -> int:
        """R3 where there are 3 nodes or more: one node may be lost; more replicas only cost writes."""
        return min(self.size, 3)

    def start(self, timeout_s: float = 30.0) -> NatsCluster:
        self.nodes = cluster_nodes(self.workdir, [self.host] * self.size, security=self.security)
        try:
            for node in self.nodes:
                node.start(timeout_s)
            for node in self.nodes:  # a meta leader elected and every node caught up: streams can be made
                wait_until(node.jetstream_current, timeout_s, f"JetStream on {node.name}", node.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
