"""Embedded NATS and Mooncake master: loopback only, and nothing left running after stop."""

from pathlib import Path

import pytest
from epd.ops.infra import MooncakeMaster, NatsServer

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
