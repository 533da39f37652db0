"""`epd worker ROLE`: load the model, run the role's stages until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import logging
import signal

from epd.ops.config import Settings
from epd.ops.tracing import setup_tracing
from epd.workers.engine import load_family
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.loop import StageLoop
from epd.workers.roles import build_stages
from epd.workers.runtime import Runtime

log = logging.getLogger(__name__)


async def run_worker(role: str, settings: Settings) -> None:
    provider = setup_tracing(f"epd-{role}", settings.trace_dir)
    ckpt = Checkpoint.open(settings.model)
    family = await asyncio.to_thread(load_family, ckpt, settings.device, settings.dtype)
    rt = await Runtime.start(settings, name=f"epd-{role}")
    stages, store = build_stages(role, rt, ckpt, family)
    loops = [StageLoop(s, rt) for s in stages]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: [lp.stop() for lp in loops])
    log.info("worker %s ready: model %s", role, settings.model)
    try:
        await asyncio.gather(*(lp.run() for lp in loops))
    finally:
        await rt.close()
        if store is not None:
            store.close()
        provider.shutdown()
