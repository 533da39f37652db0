"""`epd status`: the live worker pool and the stage queues, read from NATS."""

from __future__ import annotations

import time

import nats
from epd.core import subjects
from epd.core.heartbeat import live_workers, stage_queue
from epd.schemas.status import WorkerStatus


async def gather_status(nats_url: str, **connect: object) -> tuple[list[WorkerStatus], dict[str, dict[str, int]]]:
    """Live workers, and per stage stream: jobs waiting, jobs being worked on. `connect`: credentials, TLS."""
    servers = [u.strip() for u in nats_url.split(",") if u.strip()]  # a cluster: every node's URL
    nc = await nats.connect(servers, name="epd-status", connect_timeout=5, max_reconnect_attempts=1, **connect)
    try:
        js = nc.jetstream()
        workers = await live_workers(js)
        queues = {}
        for stage, (stream, subject) in subjects.QUEUES.items():
            try:
                waiting, working = await stage_queue(js, stream, stage, subject)
            except nats.js.errors.NotFoundError:  # the stream does not exist yet
                continue
            queues[stage] = {"waiting": waiting, "working": working}
        return workers, queues
    finally:
        await nc.close()


def render_status(workers: list[WorkerStatus], queues: dict[str, dict[str, int]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        f"{'role':<8} {'worker':<34} {'load':>6} {'served':>7} {'failed':>7} {'ec hit':>7} {'kv tok':>7} "
        f"{'beat':>6}  metrics"
    ]
    for w in sorted(workers, key=lambda w: (w.role, w.worker_id)):
        lookups = w.ec_hits + w.ec_misses
        hit = f"{100 * w.ec_hits / lookups:.0f}%" if lookups else "-"
        lines.append(
            f"{w.role:<8} {w.worker_id:<34} {f'{w.active}/{w.capacity}':>6} {w.served:>7} {w.failed:>7} {hit:>7} "
            f"{w.kv_tokens:>7} {f'{now - w.updated_at:.1f}s':>6}  {w.metrics_url or '-'}"
        )
    if not workers:
        lines.append("(no live workers)")
    lines.append("")
    lines.append(f"{'queue':<12} {'waiting':>8} {'working':>8}")
    for stage, q in queues.items():
        lines.append(f"{stage:<12} {q['waiting']:>8} {q['working']:>8}")
    return "\n".join(lines)
