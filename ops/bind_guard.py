"""Mooncake's listeners on the configured address: its transfer engine and master bind every
interface, and no setting of theirs changes it. `ops/bind_shim.c`, built by `make` into the
environment's `lib/`, is preloaded into the processes that run Mooncake so that a bind to "any"
becomes a bind to `EPD_BIND_HOST`."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SHIM = "epd_bind_shim.so"


def shim_path() -> Path | None:
    """The built shim: in this environment's `lib/` (`make`), or the system's."""
    for folder in (Path(sys.prefix) / "lib", Path("/usr/local/lib")):
        if (folder / SHIM).is_file():
            return folder / SHIM
    return None


def preload_env(bind_host: str) -> dict[str, str]:
    """The environment that keeps a child's listeners on `bind_host`; empty when it may listen anywhere."""
    try:
        address = ipaddress.ip_address(bind_host)
    except ValueError:
        return {}
    if address.is_unspecified or address.version != 4:
        return {}
    shim = shim_path()
    if shim is None:
        log.warning("%s is not built (make): Mooncake's listeners bind every interface, not %s", SHIM, bind_host)
        return {}
    preload = os.environ.get("LD_PRELOAD", "")
    if str(shim) not in preload.split():
        preload = f"{shim} {preload}".strip()
    return {"LD_PRELOAD": preload, "EPD_BIND_ONLY": bind_host}


def reexec_guarded(bind_host: str) -> None:
    """Run this process again with the shim preloaded, unless it already is (or need not be)."""
    env = preload_env(bind_host)
    if env and os.environ.get("EPD_BIND_ONLY") != bind_host:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env})
