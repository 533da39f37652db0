"""Several hosts on one machine: network namespaces on a private bridge, for tests that need real addresses.

    with Hosts(4, workdir) as hosts:          # host1 .. host4 at 10.77.X.1 .. 10.77.X.4
        hosts[1].spawn(["nats-server", ...], "nats")
        hosts[2].call(httpx.get, f"http://{hosts[1].address}:8000/health")

Layout: a switch namespace holds a bridge; each host is a namespace with one veth (`eth0`) whose peer sits on
that bridge. Nothing is added to the machine's own namespace: its routes, addresses and interfaces are
untouched, so the /24 cannot clash with a real network; the test process reaches the hosts only through
`Host.call` (a thread that has joined the host's namespace) or processes started with `Host.spawn`.

Teardown (context exit, a deadline, or the next harness finding namespaces of a dead owner) stops every process
started in a host, then deletes the namespaces; deleting a namespace deletes the veths in it. Needs root
(`ip netns`), as the tests have here and in CI.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from epd.ops.processes import spawn, stop

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_PREFIX = "epdh"  # every namespace this harness makes starts with it, then the owner's pid
_NETNS_DIR = Path("/var/run/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _in(ns: str, *args: str) -> None:
    _ip("netns", "exec", ns, "ip", *args)


def available() -> str:
    """Why the harness cannot run here ("" when it can): it needs root and `ip netns`."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    try:
        _ip("netns", "list")
    except (OSError, subprocess.CalledProcessError) as e:
        return f"`ip netns` does not work here: {e}"
    return ""


def remove_stale() -> None:
    """Delete namespaces of harnesses whose process is gone (a killed test run leaves them behind)."""
    for line in _ip("netns", "list").stdout.splitlines():
        m = re.match(rf"({_PREFIX}(\d+)\w*)", line)
        if m and not Path(f"/proc/{m.group(2)}").exists():
            _ip("netns", "del", m.group(1), check=False)


class Host:
    """One namespace: its address on the bridge, and the processes started in it."""

    def __init__(self, name: str, index: int, address: str, workdir: Path) -> None:
        self.name, self.index, self.address, self.workdir = name, index, address, workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.address})"

    @property
    def veth(self) -> str:
        """The peer of this host's `eth0` on the bridge: link it down to cut the host off."""
        return f"v{self.name[-10:]}"

    def spawn(self, argv: Sequence[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` inside this host (`ip netns exec` execs it: the pid is the program's), output in
        `workdir/logs/<host>-<name>.log`; it dies with the test process and is stopped on teardown."""
        log = self.workdir / "logs" / f"host{self.index}-{name}.log"
        self.procs[name] = spawn(["ip", "netns", "exec", self.name, *argv], log, env=env)
        return self.procs[name]

    def log(self, name: str) -> str:
        path = self.workdir / "logs" / f"host{self.index}-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def call(self, fn: Callable[..., T], *args: Any, timeout_s: float = 300.0, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a thread inside this host's namespace: its sockets are the host's."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(4, f"ns-{self.name}", self._enter)
        return self._pool.submit(fn, *args, **kwargs).result(timeout=timeout_s)

    def _enter(self) -> None:
        # setns(2) moves only the calling thread (Python 3.11 has no os.setns)
        with open(_NETNS_DIR / self.name) as f:
            if ctypes.CDLL("libc.so.6", use_errno=True).setns(f.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.name}")

    def stop(self, names: Sequence[str] | None = None) -> None:
        chosen = [self.procs.pop(n) for n in (names if names is not None else list(self.procs))]
        stop(chosen, grace_s=5.0)

    def close(self) -> None:
        self.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class Hosts:
    """`count` hosts named host1.. on one /24 (10.77.<subnet>.0/24), torn down on exit or after `deadline_s`."""

    def __init__(self, count: int, workdir: Path, subnet: int | None = None, deadline_s: float = 900.0) -> None:
        if not 1 <= count <= 200:
            raise ValueError(f"{count} hosts: 1..200 fit in the /24")
        self.count, self.workdir, self.deadline_s = count, workdir, deadline_s
        self.tag = f"{_PREFIX}{os.getpid()}{os.urandom(2).hex()}"  # pid first: remove_stale reads it
        self.subnet = subnet if subnet is not None else 77 + os.getpid() % 150  # 10.77.77..226: ours alone
        self.switch = f"{self.tag}sw"
        self.hosts: list[Host] = []
        self._timer: threading.Timer | None = None
        self.expired = False

    def __getitem__(self, index: int) -> Host:
        """hosts[1] is host1."""
        return self.hosts[index - 1]

    def __iter__(self):  # noqa: ANN204 - an iterator of Host
        return iter(self.hosts)

    def address(self, index: int) -> str:
        return f"10.77.{self.subnet}.{index}"

    def __enter__(self) -> Hosts:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        remove_stale()
        self._timer = threading.Timer(self.deadline_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        _ip("netns", "add", self.switch)
        _in(self.switch, "link", "add", "br0", "type", "bridge")
        _in(self.switch, "link", "set", "br0", "up")
        for i in range(1, self.count + 1):
            host = Host(f"{self.tag}h{i}", i, self.address(i), self.workdir)
            self.hosts.append(host)
            _ip("netns", "add", host.name)
            # both ends made inside the namespaces: the machine's own namespace never holds them
            _ip("link", "add", "eth0", "netns", host.name, "type", "veth", "peer", "name", host.veth, "netns",
                self.switch)  # fmt: skip
            _in(self.switch, "link", "set", host.veth, "master", "br0", "up")
            _in(host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _in(host.name, "link", "set", "eth0", "up")
            _in(host.name, "link", "set", "lo", "up")

    def _expire(self) -> None:
        """The deadline passed: stop every process, so the test fails instead of hanging."""
        self.expired = True
        for host in self.hosts:
            for p in host.procs.values():
                if p.poll() is None:
                    p.kill()

    def cut(self, index: int) -> None:
        """Take host `index` off the network: its link on the bridge goes down (its processes keep running)."""
        _in(self.switch, "link", "set", self[index].veth, "down")

    def mend(self, index: int) -> None:
        _in(self.switch, "link", "set", self[index].veth, "up")

    def down(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for host in self.hosts:
            host.close()
        for name in [h.name for h in self.hosts] + [self.switch]:
            _ip("netns", "del", name, check=False)
        self.hosts.clear()

    def names(self) -> list[str]:
        return [h.name for h in self.hosts]
