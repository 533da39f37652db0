"""The embedded JetStream cluster (`epd up --nats-cluster 3`) on loopback, and the hosts harness's teardown."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import nats
import pytest
from epd.core.config import Settings
from epd.core.runtime import Runtime
from epd.ops.nats_cluster import NatsCluster

from .hosts import Hosts, available

pytestmark = pytest.mark.integration


async def test_a_three_node_cluster_replicates_and_serves_with_a_node_lost(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path / "nats", 3).start()
    try:
        assert len(cluster.url.split(",")) == 3 and cluster.replicas == 3
        rt = await Runtime.start(Settings(nats_url=cluster.url, nats_replicas=cluster.replicas), "test")
        try:
            infos = await rt.js.streams_info()
            assert {i.config.name: i.config.num_replicas for i in infos} == dict.fromkeys(
                ["EPD_ENCODE", "EPD_PREFILL", "EPD_DECODE", "KV_epd_workers", "KV_epd_encoding", "OBJ_epd_images"], 3
            )
            cluster.nodes[0].stop()  # whichever node the client was on: it moves on, and R3 keeps a quorum
            deadline = time.monotonic() + 30
            while True:
                try:
                    ack = await rt.js.publish("epd.v1.encode", b"x", timeout=2)
                    break
                except (nats.errors.Error, TimeoutError):
                    assert time.monotonic() < deadline, "no stream leader after losing one node"
            assert ack.stream == "EPD_ENCODE"
        finally:
            await rt.close()
    finally:
        cluster.stop()
    assert all(n.proc.poll() is not None for n in cluster.nodes)


def test_epd_up_takes_nats_cluster() -> None:
    from epd.ops.cli import parser

    args = parser().parse_args(["up", "--nats-cluster", "3"])
    assert args.nats_cluster == 3


@pytest.mark.skipif(bool(available()), reason=available() or "")
def test_the_harness_leaves_nothing_behind(tmp_path: Path) -> None:
    with Hosts(2, tmp_path) as hosts:
        names = hosts.names() + [hosts.switch]
        sleeper = hosts[2].spawn(["sleep", "600"], "sleep")
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(n in listed for n in names)
        hosts[1].call(lambda: socket.create_server((hosts[1].address, 0)).close())  # the address is host1's ...
        with pytest.raises(OSError):
            socket.create_server((hosts[1].address, 0))  # ... and not this machine's
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names), listed
    assert sleeper.poll() is not None  # stopped and reaped


@pytest.mark.skipif(bool(available()), reason=available() or "")
def test_the_harness_deadline_stops_its_processes(tmp_path: Path) -> None:
    with Hosts(1, tmp_path, deadline_s=1.0) as hosts:
        sleeper = hosts[1].spawn(["sleep", "600"], "sleep")
        assert sleeper.wait(timeout=10) != 0 and hosts.expired
