"""`epd worker ROLE`: load the model, run the role's stages until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import logging
import signal

from epd.core.config import Settings
from epd.core.heartbeat import Heartbeat
from epd.core.loop_lag import watch_loop_lag
from epd.core.metrics import serve_metrics
from epd.core.runtime import Runtime
from epd.core.tracing import setup_tracing
from epd.workers.engine import load_family
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.loop import StageLoop
from epd.workers.roles import build_role, weights_for

log = logging.getLogger(__name__)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


async def run_worker(role: str, settings: Settings) -> None:
    provider = setup_tracing(f"epd-{role}", settings)
    if settings.engine_for(role) == "vllm":  # vLLM loads the model: epd's engine stays unloaded
        from epd.workers.vllm_engine import vllm_role

        weights = "vllm"
        # Until the graceful handlers below: SIGTERM unwinds (SystemExit), so vLLM's finalizers stop the engine
        # process it is starting; the default action would leave that process behind.
        signal.signal(signal.SIGTERM, _exit)
        rt = await Runtime.start(settings, name=f"epd-{role}")
        parts = await vllm_role(role, rt)
    else:
        ckpt = Checkpoint.open(settings.model)
        weights = weights_for(role, settings)  # the half of the model this role runs, or all of it
        family = await asyncio.to_thread(
            load_family, ckpt, settings.device, settings.dtype, weights, settings.image_preprocess
        )
        rt = await Runtime.start(settings, name=f"epd-{role}")
        parts = build_role(role, rt, ckpt, family)
    loops = [StageLoop(s, rt) for s in parts.stages]
    metrics_url = serve_metrics(settings.bind_host, settings.metrics_port, settings.reachable_host)
    heartbeat = Heartbeat(rt, role, [(s.durable, s.subject) for s in parts.stages], metrics_url)
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        for lp in loops:
            lp.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    log.info(
        "worker %s (%s) ready: model %s (weights: %s), metrics %s",
        role,
        heartbeat.worker_id,
        settings.model,
        weights,
        metrics_url,
    )
    beating = asyncio.create_task(heartbeat.run(stopping))
    background = [asyncio.create_task(task(stopping)) for task in parts.background]
    background.append(asyncio.create_task(watch_loop_lag(role, stopping)))
    try:
        await asyncio.gather(*(lp.run() for lp in loops))
    finally:
        stopping.set()
        await asyncio.gather(beating, *background)
        await rt.close()
        if parts.shutdown is not None:
            parts.shutdown()
        if parts.store is not None:
            parts.store.close()
        if provider is not None:
            provider.shutdown()
