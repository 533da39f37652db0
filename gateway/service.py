"""The gateway process's core: submit a request, get its reply stream; the NATS-native API."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import msgspec
import nats
from epd.connectors.ec_mooncake import MooncakeECConnector
from epd.connectors.keys import KeySpace
from epd.connectors.mooncake_store import MooncakeStore, StoreError
from epd.core import metrics, subjects
from epd.core.config import TOPOLOGY_ROLES, Settings
from epd.core.heartbeat import live_workers
from epd.core.runtime import Runtime
from epd.core.tracing import extract_context, tracer
from epd.schemas.codec import Decoder, WireError, encode
from epd.schemas.control import Cancel
from epd.schemas.reply import ErrorReply
from epd.schemas.request import Request
from epd.schemas.status import WorkerStatus
from opentelemetry.trace import SpanKind

from .dead_letters import watch_dead_letters
from .errors import ApiError
from .image_urls import ImageUrls
from .replies import ReplyStream
from .router import Router

log = logging.getLogger(__name__)


class PoolWatch:
    """Which roles have had no live worker (heartbeat) for longer than the grace period; checked every second."""

    def __init__(self, rt: Runtime, roles: tuple[str, ...], grace_s: float) -> None:
        self.rt, self.roles, self.grace_s = rt, roles, grace_s
        self._missing_since: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        now = time.monotonic()
        self._missing_since = dict.fromkeys(self.roles, now)  # until the first heartbeats are read
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Cancel the watch; wait for it briefly, never forever (shutdown must not hang on it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=2.0)

    async def live(self, role: str) -> bool:
        """Whether a worker of `role` is alive. The periodic read lags by up to a second, so when it says
        no, ask NATS again before anyone acts on it (this happens only while the role seems absent)."""
        if role not in self._missing_since:
            return True
        try:
            await self._read()
        except (nats.errors.Error, asyncio.TimeoutError):
            return False
        return role not in self._missing_since

    def size(self, role: str) -> int:
        """Live workers of `role` at the last read (at most a second old)."""
        return self._counts.get(role, 0)

    def missing_roles(self) -> list[str]:
        now = time.monotonic()
        return [r for r, since in self._missing_since.items() if now - since > self.grace_s]

    async def _read(self) -> None:
        self.observe(await live_workers(self.rt.js))

    def observe(self, workers: list[WorkerStatus]) -> None:
        """Take a fresh read of the live pool (the watch's own, or anyone's who read it)."""
        live = {w.role for w in workers}
        self._counts = {role: sum(w.role == role for w in workers) for role in live}
        now = time.monotonic()
        for role in self.roles:
            if role in live:
                self._missing_since.pop(role, None)
            else:
                self._missing_since.setdefault(role, now)

    async def _run(self) -> None:
        while True:
            try:
                await self._read()
            except (nats.errors.Error, asyncio.TimeoutError) as e:
                log.warning("cannot read the worker pool: %s", e)
            await asyncio.sleep(1.0)


def dependency_down(name: str, why: str) -> ApiError:
    """A retryable 503 that names what is away (a restart under a supervisor takes seconds)."""
    return ApiError(
        503,
        f"{name} is unavailable ({why}); retry shortly",
        "server_error",
        code=f"{name}_unavailable",
        retry_after_s=2,
    )


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class Gateway:
    def __init__(self, rt: Runtime, router: Router, store: MooncakeStore | None) -> None:
        self.rt, self.router, self.store = rt, router, store
        self.settings = rt.settings
        self.image_urls = ImageUrls(rt.settings)
        self.inflight = 0
        self.pool = PoolWatch(rt, TOPOLOGY_ROLES[rt.settings.topology], rt.settings.pool_grace_s)
        self.router.live = self.pool.live
        self.router.pool_size = self.pool.size
        self._request_decoder = Decoder(Request)

    @classmethod
    async def start(cls, settings: Settings) -> Gateway:
        rt = await Runtime.start(settings, name="epd-gateway")
        store = None if settings.topology == "epd" else MooncakeStore(settings, segment_mb=0)
        ec = MooncakeECConnector(store) if store else None
        gw = cls(rt, Router(rt, KeySpace.for_checkpoint(settings.model), ec), store)
        await rt.nc.subscribe(subjects.REQUEST, queue="epd-gateway", cb=gw._on_nats_request)
        await watch_dead_letters(rt)
        gw.pool.start()
        return gw

    async def submit(self, req: Request) -> ReplyStream:
        """Route a request whose replies this gateway reads (HTTP clients); fail fast when overloaded,
        and with a retryable 503 (never a bare 500) when NATS or the Mooncake master is away."""
        self.admit(req)
        req.request_id = req.request_id or new_request_id()
        self.inflight += 1
        replies = ReplyStream(
            self.rt.nc,
            req.request_id,
            self.settings.request_timeout_s,
            on_close=self._release,
            resumer=lambda attempt, tokens, n: self._resume(req, attempt, tokens, n),
        )
        try:
            await replies.open()
            req.reply_to = replies.inbox
            await self.router.route(req)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            await replies.close()
            raise dependency_down("nats", f"{type(e).__name__}: {e}") from None
        except StoreError as e:
            await replies.close()
            raise dependency_down("mooncake-master", str(e)) from None
        except BaseException:
            await replies.close()
            raise
        return replies

    def admit(self, req: Request) -> None:
        """429 over the in-flight limit; 503 when a stage it needs has had no live worker for the grace period."""
        if not self.rt.nc.is_connected:  # (a publish now would wait out its timeout in the reconnect buffer)
            raise dependency_down("nats", "not connected, reconnecting")
        if self.inflight >= self.settings.max_inflight:
            raise ApiError(
                429,
                f"{self.inflight} requests in flight, this gateway's limit; retry shortly",
                "rate_limit_error",
                retry_after_s=1,
            )
        required = self.settings.required_roles
        gone = [r for r in self.pool.missing_roles() if r in required and (r != "encode" or req.images())]
        if gone:
            raise ApiError(503, f"no live {', '.join(gone)} worker; retry shortly", "server_error", retry_after_s=5)

    async def _resume(self, req: Request, attempt: str, tokens: list[int], n: int) -> str | None:
        """Send request `req` again as a continuation after `tokens` (its client has them), as attempt `n`;
        the attempt given up on is cancelled wherever it still runs. None: nothing is left to generate."""
        left = req.sampling.max_tokens - len(tokens)
        if left < 1:
            return None
        cont = msgspec.structs.replace(
            req,
            request_id=f"{req.request_id}-r{n}",
            resume_tokens=list(req.resume_tokens) + tokens,
            sampling=msgspec.structs.replace(req.sampling, max_tokens=left),
        )
        await self.cancel(attempt)
        await self.router.route(cont)
        metrics.RESUMES.inc()
        return cont.request_id

    def _release(self) -> None:
        self.inflight -= 1

    async def cancel(self, request_id: str) -> None:
        await self.rt.nc.publish(subjects.CANCEL, encode(Cancel(request_id=request_id)))

    async def readiness(self) -> dict:
        """Ready: NATS connected and a live worker of each role the topology cannot serve without.

        `workers` counts every role of the topology (encoders too when prefill may encode inline).
        """
        roles, needed = TOPOLOGY_ROLES[self.settings.topology], self.settings.required_roles
        mooncake = await self._mooncake_state()
        down = [] if mooncake in ("connected", "unused") else ["mooncake-master"]
        if not self.rt.nc.is_connected:
            return {
                "ready": False,
                "down": ["nats", *down],
                "nats": "disconnected",
                "mooncake": mooncake,
                "workers": dict.fromkeys(roles, 0),
            }
        try:
            workers = await live_workers(self.rt.js)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            return {
                "ready": False,
                "down": ["nats", *down],
                "nats": f"error: {e}",
                "mooncake": mooncake,
                "workers": dict.fromkeys(roles, 0),
            }
        self.pool.observe(workers)  # ready means the router sees this pool too
        counts = {role: self.pool.size(role) for role in roles}
        down += [f"{r} workers" for r in needed if not counts[r]]
        return {"ready": not down, "down": down, "nats": "connected", "mooncake": mooncake, "workers": counts}

    async def _mooncake_state(self) -> str:
        """Whether the Mooncake master accepts connections (its RPC port); 'unused' without a store."""
        if self.store is None or not self.settings.mooncake_master:
            return "unused"
        host, _, port = self.settings.mooncake_master.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout=1.0)
        except (OSError, ValueError, asyncio.TimeoutError) as e:
            return f"unreachable: {e or type(e).__name__}"
        writer.close()
        return "connected"

    async def _on_nats_request(self, msg: nats.aio.msg.Msg) -> None:
        """NATS-native API: the client reads chunks on its own reply subject."""
        request_id = ""
        with tracer().start_as_current_span(
            f"nats {subjects.REQUEST}",
            context=extract_context(msg.headers),
            kind=SpanKind.SERVER,
            attributes={"messaging.system": "nats", "gen_ai.operation.name": "chat"},
        ) as span:
            try:
                req = self._request_decoder.decode(msg.data)
                req.request_id = req.request_id or new_request_id()
                request_id = req.request_id
                span.set_attribute("epd.request_id", request_id)
                span.set_attribute("gen_ai.request.model", req.model)
                req.reply_to = msg.reply
                if not msg.reply:
                    raise ApiError(400, "publish the request with a reply subject to read its tokens")
                await self.router.route(req)
                metrics.REQUESTS.labels(req.model, "202").inc()
            except (WireError, ApiError) as e:
                status = e.status if isinstance(e, ApiError) else 400
                span.set_attribute("epd.status", status)
                metrics.REQUESTS.labels("", str(status)).inc()
                metrics.ERRORS.labels("gateway", str(status)).inc()
                if msg.reply:
                    await self.rt.reply(
                        msg.reply,
                        ErrorReply(request_id=request_id, status=status, message=str(e), type="invalid_request_error"),
                    )

    async def close(self) -> None:
        await self.pool.stop()
        await self.rt.close()
        if self.store is not None:
            self.store.close()
