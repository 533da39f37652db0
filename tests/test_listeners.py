"""Every listening socket of a running `e-p-d` cluster is on the configured address (loopback by
default): NATS, the Mooncake master, the gateway, the workers' metrics, and Mooncake's own transfer
engine listeners, which bind every interface unless `ops/bind_shim.c` is preloaded."""

import ipaddress
import os
from pathlib import Path

import pytest
from epd.ops.bind_guard import preload_env

from .conftest import chat_body, post, start_cluster

pytestmark = pytest.mark.e2e


def _address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host byte order), as text; an IPv6
    socket bound to an IPv4 address (v4-mapped) as that IPv4 address."""
    raw = bytes.fromhex(hex_address)
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    return str(getattr(address, "ipv4_mapped", None) or address)


def listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of each TCP socket that process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                address, port = local.split(":")
                found.append((_address(address), int(port, 16)))
    return found


def test_the_address_a_shim_guards() -> None:
    assert preload_env("0.0.0.0") == {} and preload_env("::") == {}  # listening everywhere was asked for
    env = preload_env("127.0.0.1")
    assert env["EPD_BIND_ONLY"] == "127.0.0.1" and env["LD_PRELOAD"].split()[0].endswith("epd_bind_shim.so")


async def test_every_listener_binds_loopback(tiny_model: Path, tmp_path: Path) -> None:
    cluster = start_cluster(tiny_model, tmp_path, "e-p-d")
    try:
        r = await post(cluster, chat_body("Listening?"))  # every connection made, every engine up
        assert r.status_code == 200, r.text
        processes = {name: p.pid for name, p in cluster.procs.items()}
        processes["nats-server"] = cluster.nats.proc.pid
        processes["mooncake-master"] = cluster.master.proc.pid
        seen = {name: listeners(pid) for name, pid in processes.items()}
    finally:
        cluster.stop()
    # each process listens somewhere (the test would pass on nothing otherwise): Mooncake's
    # transfer engine in every worker and the gateway, NATS, the master's RPC and metadata
    assert all(seen.values()), seen
    assert cluster.settings.bind_host == "127.0.0.1"  # the default
    assert len(seen["decode-0"]) >= 3  # metrics, and the TransferEngine of the direct KV path besides the store's
    wide = {name: [s for s in sockets if s[0] != cluster.settings.bind_host] for name, sockets in seen.items()}
    assert not any(wide.values()), wide
