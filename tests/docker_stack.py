"""A Docker engine and Compose for the tests: `docker compose config` for the file's checks, and for the compose
test an engine (started here when none answers), the local base image, the build inputs and a compose project.

No container registry is reachable where epd is tested, so every image is built here: the base from Debian's
archive (debootstrap + docker import), the rest from it with the packages the package registries serve.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
OVERRIDE = ROOT / "tests" / "compose" / "override.yml"
# Debian bookworm, minbase, from deb.debian.org: the FROM of every image built here (build argument BASE)
BASE_IMAGE = "epd-test/debian:bookworm-minbase"
SITE_CA_DIR = Path("/usr/local/share/ca-certificates")  # a re-signing proxy's CAs, where the host has them
BUILD_CA_DIR = ROOT / "ops" / "ca-certificates"  # what ops/Dockerfile copies in (git-ignored)
WHEELHOUSE_PORT = 38765
MISSING = "no Docker Compose v2 here: `make docker-tools` installs it (ops/docker_tools.sh)"


def run(argv: list[str], timeout_s: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A command's output as text; on failure the error names the command and carries its output."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as e:
        raise AssertionError(MISSING) from e
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@functools.cache
def compose_config(*profiles: str, overrides: tuple[Path, ...] = ()) -> dict:
    """docker-compose.yml (and `overrides` over it) as Compose itself reads it (extends resolved, defaults
    filled), for `profiles`."""
    flags = [a for p in profiles for a in ("--profile", p)]
    files = [a for f in (COMPOSE_FILE, *overrides) for a in ("-f", str(f))]
    return json.loads(run(["docker", "compose", *files, *flags, "config", "--format", "json"]).stdout)


def engine_answers() -> bool:
    return run(["docker", "info"], timeout_s=20, check=False).returncode == 0


@contextmanager
def docker_engine(log_dir: Path) -> Iterator[None]:
    """The running engine, or one started here (and stopped after, with its containerd) when none answers.

    The flags suit a machine without a firewall to manage: no iptables rules, no default bridge (compose makes
    its own network), overlay2 (containers start in under a second; vfs takes several).
    """
    if engine_answers():
        yield
        return
    dockerd = shutil.which("dockerd")
    assert dockerd, "no dockerd: `make docker-tools` installs Debian's docker.io"
    log = (log_dir / "dockerd.log").open("wb")
    argv = [dockerd, "--storage-driver=overlay2", "--iptables=false", "--ip-forward=false", "--bridge=none"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not engine_answers():
            assert proc.poll() is None, f"dockerd exited {proc.returncode}: see {log.name}"
            assert time.monotonic() < deadline, f"dockerd did not answer in 60 s: see {log.name}"
            time.sleep(0.5)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)  # dockerd stops its containers and its containerd, then exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def ensure_base_image() -> None:
    """BASE_IMAGE, made once per engine: about 90 s and 200 MB from Debian's archive."""
    if run(["docker", "image", "inspect", BASE_IMAGE], check=False).returncode == 0:
        return
    assert shutil.which("debootstrap"), "no debootstrap: `make docker-tools` installs it"
    with tempfile.TemporaryDirectory(prefix="epd-rootfs-") as rootfs:
        run(["debootstrap", "--variant=minbase", "bookworm", rootfs, "http://deb.debian.org/debian"], timeout_s=900)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True)
        tar.wait()
        assert imported.returncode == 0 and tar.returncode == 0, imported.stderr


def pip_find_links() -> Path | None:
    """The local wheelhouse (where the CPU torch wheel is): $EPD_WHEELHOUSE, else the one pip is configured with."""
    if "EPD_WHEELHOUSE" in os.environ:
        return Path(os.environ["EPD_WHEELHOUSE"])
    argv = [sys.executable, "-m", "pip", "config", "get", "global.find-links"]
    value = run(argv, check=False).stdout.split()
    path = Path(value[0].removeprefix("file://")) if value else None
    return path if path is not None and path.is_dir() else None


@contextmanager
def build_args() -> Iterator[list[str]]:
    """`docker compose build` arguments for this machine; the site's CA files sit in the context meanwhile.

    A local wheelhouse is served over HTTP on loopback (builds run on the host's network) and passed as
    PIP_FIND_LINKS; the CPU torch index (download.pytorch.org) is dropped, as the wheelhouse stands in for it.
    """
    args = ["--build-arg", f"BASE={BASE_IMAGE}"]
    copied = []
    for crt in sorted(SITE_CA_DIR.glob("*.crt")) if SITE_CA_DIR.is_dir() else []:
        target = BUILD_CA_DIR / crt.name
        if not target.exists():
            shutil.copyfile(crt, target)
            copied.append(target)
    server = None
    wheels = pip_find_links()
    if wheels is not None:
        handler = functools.partial(QuietFiles, directory=str(wheels))
        try:  # one port every time: a build argument's value is part of the layer cache's key
            server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
        except OSError:  # taken: any port, and the dependency layer builds again
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        args += ["--build-arg", f"PIP_FIND_LINKS=http://127.0.0.1:{server.server_port}/"]
        args += ["--build-arg", "TORCH_CPU_INDEX="]
    try:
        yield args
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        for path in copied:
            path.unlink()


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class Project:
    """One compose project: the product's file with the test's override, under its own project name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.base = ["docker", "compose", "-p", name, "-f", str(COMPOSE_FILE), "-f", str(OVERRIDE)]

    def __call__(self, *args: str, timeout_s: float = 600, check: bool = True) -> str:
        return run([*self.base, *args], timeout_s=timeout_s, check=check).stdout

    def containers(self, *services: str) -> list[str]:
        """Ids of the project's containers (of `services`, else all), running or not."""
        return self("ps", "-a", "-q", *services).split()

    def labelled(self, kind: str) -> list[str]:
        """Ids of engine objects (container, network, volume) that carry this project's label."""
        flag = ["-a"] if kind == "container" else []
        argv = ["docker", kind, "ls", *flag, "-q", "--filter", f"label=com.docker.compose.project={self.name}"]
        return run(argv).stdout.split()

    def exec_python(self, service: str, index: int, code: str) -> str:
        return self("exec", "-T", "--index", str(index), service, "python3", "-c", code, timeout_s=60)


def container_ip(container: str) -> str:
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
    return run(["docker", "inspect", "-f", fmt, container]).stdout.strip()
