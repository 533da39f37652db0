"""Embedded NATS and Mooncake master: loopback only, and nothing left running after stop."""

from pathlib import Path

import nats
import pytest
from epd.ops.infra import MooncakeMaster, NatsServer
from epd.ops.processes import port_open

pytestmark = pytest.mark.integration


def listening(pid: int) -> set[str]:
    """Local addresses a process listens on, from /proc (no extra tools)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink()) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addrs = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                host = cols[1].split(":")[0]
                addrs.add("127.0.0.1" if host == "0100007F" else host)
    return addrs


def test_nats_and_master_listen_on_loopback_and_stop_cleanly(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    master = MooncakeMaster(tmp_path / "mc").start()
    try:
        assert listening(nats.proc.pid) == {"127.0.0.1"}
        assert "127.0.0.1" in listening(master.proc.pid)
        assert (tmp_path / "nats" / "nats.conf").read_text().count("max_payload") == 1
    finally:
        nats.stop()
        master.stop()
    for p in (nats.proc, master.proc):
        assert p.poll() is not None
        assert not Path(f"/proc/{p.pid}").exists()  # reaped, not a zombie


async def test_nats_credentials(tmp_path: Path) -> None:
    """A NATS server that wants a user and password: the settings' credentials get in, none do not."""
    from epd.ops.config import Settings
    from epd.ops.processes import find_binary, free_port, spawn, stop, wait_until
    from epd.workers.runtime import connect

    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: 127.0.0.1:{port}\nauthorization {{ user: "epd", password: "pw-for-tests" }}\n')
    proc = spawn([find_binary("nats-server"), "-c", str(conf)], tmp_path / "nats.log")
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 20, "nats-server", proc)
        url = f"nats://127.0.0.1:{port}"
        nc = await connect(Settings(nats_url=url, nats_user="epd", nats_password="pw-for-tests"), "test")
        assert nc.is_connected
        await nc.close()
        with pytest.raises(nats.errors.Error):
            await nats.connect(url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=2)
    finally:
        stop([proc])
