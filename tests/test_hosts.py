"""e-p-d over five hosts (network namespaces, tests/hosts.py), NATS a 3-node JetStream cluster with TLS and passwords.

    host1  gateway, Mooncake master, NATS node 1
    host2  encoder, NATS node 2
    host3  prefill, NATS node 3
    host4  decoder
    host5  a second prefill and decoder (a lost host's work continues here)

Every process binds and advertises its host's address; the test process reaches them only from inside a host.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import nats
import pytest
from epd.core import subjects
from epd.core.config import Settings
from epd.ops.bind_guard import preload_env
from epd.ops.infra import NatsSecurity, master_argv
from epd.ops.nats_cluster import cluster_nodes, servers_url
from epd.ops.processes import find_binary, wait_until

from .certs import make_certs
from .conftest import MAX_NEW, chat_body, png_bytes
from .hosts import Hosts, available
from .oracle import reference
from .test_listeners import listeners

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(available()), reason=available() or "")]

NATS_PORTS = (4222, 6222, 8222)  # client, route, monitoring: each host has its own port space
MASTER_PORTS = (50051, 8080, 9003)  # RPC, HTTP metadata, metrics
GATEWAY_PORT = 8000
ROLES = {"encode": (2,), "prefill": (3, 5), "decode": (4, 5)}  # role -> hosts running one of it


class Deployment:
    """The processes on the hosts, and how to reach the gateway from inside host1."""

    def __init__(self, hosts: Hosts, model: Path, workdir: Path) -> None:
        self.hosts, self.workdir = hosts, workdir
        ca, cert, key = make_certs(workdir / "certs", [h.address for h in hosts])
        self.security = NatsSecurity(
            str(ca), str(cert), str(key), "epd", secrets.token_hex(8), route_password=secrets.token_hex(8)
        )
        self.nats = cluster_nodes(workdir / "nats", [hosts.address(i) for i in (1, 2, 3)], NATS_PORTS, self.security)
        a1 = hosts.address(1)
        self.settings = Settings(
            model=model,
            topology="e-p-d",
            nats_url=servers_url(self.nats),
            nats_replicas=3,
            nats_user=self.security.user,
            nats_password=self.security.password,
            nats_tls_ca=str(ca),
            mooncake_master=f"{a1}:{MASTER_PORTS[0]}",
            mooncake_metadata=f"http://{a1}:{MASTER_PORTS[1]}/metadata",
            mooncake_segment_mb=32,
            trace_dir=str(workdir / "traces"),
            ack_wait_s=6.0,  # a job held by a lost host comes back this soon
            host=a1,
            port=GATEWAY_PORT,
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.hosts.address(1)}:{GATEWAY_PORT}"

    def start(self) -> None:
        for i in range(1, len(self.nats) + 1):
            self.start_nats(i)
        for i, node in enumerate(self.nats, 1):
            wait_until(lambda n=node, h=self.hosts[i]: h.call(n.jetstream_current), 60, f"NATS node {i}")
        a1 = self.hosts.address(1)
        self.hosts[1].spawn(master_argv(a1, *MASTER_PORTS), "master", env=preload_env(a1))
        for role, where in ROLES.items():
            for i in where:
                self.start_worker(role, i)
        self.hosts[1].spawn([sys.executable, "-m", "epd.ops.cli", "gateway"], "gateway", env=self.env(1))
        wait_until(self.ready, 240, "gateway and every worker", self.hosts[1].procs["gateway"])

    def env(self, index: int) -> dict[str, str]:
        """A process on host `index`: binds and advertises that host's address."""
        return self.settings.replace(bind_host=self.hosts.address(index)).env()

    def start_nats(self, index: int) -> subprocess.Popen:
        node = self.nats[index - 1]
        node.workdir.mkdir(parents=True, exist_ok=True)
        conf = node.workdir / "nats.conf"
        conf.write_text(node.config())
        return self.hosts[index].spawn([find_binary("nats-server"), "-c", str(conf)], "nats")

    def start_worker(self, role: str, index: int) -> subprocess.Popen:
        return self.hosts[index].spawn([sys.executable, "-m", "epd.ops.cli", "worker", role], role, env=self.env(index))

    def workers(self) -> dict[str, int]:
        try:
            return self.hosts[1].call(lambda: httpx.get(self.base_url + "/ready", timeout=2).json()["workers"])
        except (httpx.HTTPError, ValueError, KeyError):
            return {}

    def ready(self) -> bool:
        live = self.workers()
        return all(live.get(role, 0) >= len(where) for role, where in ROLES.items())

    def chat(self, bodies: list[dict]) -> list[httpx.Response]:
        """The requests at once, from host1."""

        async def send() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=180) as client:
                return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))

        return self.hosts[1].call(asyncio.run, send())

    def spans(self) -> list[dict]:
        time.sleep(1.0)  # the exporters flush every 200 ms
        out = []
        for path in Path(self.settings.trace_dir).glob("*.jsonl"):
            out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return out


@pytest.fixture(scope="module")
def deployment(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("hosts")
    with Hosts(5, workdir, deadline_s=600) as hosts:
        d = Deployment(hosts, tiny_model, workdir)
        d.start()
        yield d


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_roles_on_their_hosts_answer_as_generate_and_trace_the_crossings(deployment: Deployment, tiny_model: Path):
    d, hosts = deployment, deployment.hosts
    image = png_bytes(color=(20, 160, 90), shape="circle")
    [r] = d.chat([chat_body("What is on the picture?", image)])
    assert answer(r) == reference(tiny_model, "What is on the picture?", image, MAX_NEW)[1]

    trace = [s for s in d.spans() if s["attributes"].get("epd.request_id") == r.json()["id"]]
    assert trace, "the gateway's span of the request"
    spans = [s for s in d.spans() if s["trace_id"] == trace[0]["trace_id"]]
    where = {(s["name"], s["host"]) for s in spans}
    a = hosts.address
    assert ("ec.save", a(2)) in where, where  # the embedding saved on host2 ...
    loads = [s for s in spans if s["name"] == "ec.load"]
    assert loads and all(s["attributes"]["epd.hits"] >= 1 for s in loads)  # ... and loaded, not re-encoded
    sends = [s for s in spans if s["name"] == "kv.send" and s["attributes"]["epd.path"] == "direct"]
    assert len(sends) == 1, spans
    [recv] = [s for s in spans if s["name"] == "kv.recv"]
    # KV written by a prefill host straight into the memory of the decode host that received it
    assert sends[0]["host"] in (a(3), a(5)) and recv["host"] in (a(4), a(5)), (sends, recv)
    assert sends[0]["attributes"]["epd.kv.peer"].split(":")[0] == recv["host"]
    assert loads[0]["host"] == sends[0]["host"]


def test_every_process_listens_on_its_host_address_only(deployment: Deployment) -> None:
    for host in deployment.hosts:
        for name, proc in host.procs.items():
            seen = listeners(proc.pid)
            assert seen, (host, name)
            assert {address for address, _ in seen} == {host.address}, (host, name, seen)


def test_streams_and_buckets_are_replicated_three_times(deployment: Deployment) -> None:
    async def replicas() -> dict[str, int]:
        s = deployment.settings
        ctx = ssl.create_default_context(cafile=s.nats_tls_ca)
        nc = await nats.connect(s.nats_servers, user=s.nats_user, password=s.nats_password, tls=ctx)
        try:
            return {i.config.name: i.config.num_replicas for i in await nc.jetstream().streams_info()}
        finally:
            await nc.close()

    got = deployment.hosts[2].call(asyncio.run, replicas())
    assert {"KV_epd_workers", "KV_epd_encoding", "OBJ_epd_images"} <= set(got), got
    assert set(got.values()) == {3}, got


def test_a_client_without_credentials_or_tls_is_refused(deployment: Deployment) -> None:
    s, url = deployment.settings, deployment.settings.nats_servers[0]
    ctx = ssl.create_default_context(cafile=s.nats_tls_ca)

    async def attempt(**kw: object) -> str:
        try:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3, max_reconnect_attempts=0, **kw)
        except Exception as e:  # noqa: BLE001 - which error says why: asserted below
            return f"{type(e).__name__}: {e}"
        await nc.close()
        return "connected"

    def tries() -> list[str]:
        return [
            asyncio.run(attempt(tls=ctx)),  # TLS, no password
            asyncio.run(attempt(tls=ctx, user=s.nats_user, password="wrong")),
            asyncio.run(attempt(user=s.nats_user, password=s.nats_password)),  # the password, in clear: no TLS
            asyncio.run(attempt(tls=ctx, user=s.nats_user, password=s.nats_password)),
        ]

    no_password, wrong, plain, right = deployment.hosts[4].call(tries)
    assert "authorization" in no_password.lower(), no_password
    assert "authorization" in wrong.lower(), wrong
    assert plain != "connected", plain
    assert right == "connected", right


def test_losing_a_nats_node_under_load_loses_no_request(deployment: Deployment, tiny_model: Path) -> None:
    d = deployment
    questions = [f"Count to {i}." for i in range(8)]
    expected = [reference(tiny_model, q, None, MAX_NEW)[1] for q in questions]
    bodies = [chat_body(q) for q in questions]

    async def load_and_kill() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=d.base_url, timeout=180) as client:
            sent = [asyncio.create_task(client.post("/v1/chat/completions", json=b)) for b in bodies]
            await asyncio.sleep(0.3)
            d.hosts[2].stop(["nats"])  # SIGTERM, then SIGKILL
            return await asyncio.gather(*sent)

    replies = d.hosts[1].call(asyncio.run, load_and_kill())
    assert [answer(r) for r in replies] == expected
    d.start_nats(2)  # back for the tests after this one: it catches up from the others
    wait_until(lambda: d.hosts[2].call(d.nats[1].jetstream_current), 60, "NATS node 2 back")


def test_a_cut_host_work_continues_elsewhere_and_it_rejoins(deployment: Deployment, tiny_model: Path) -> None:
    """host5's prefill holds a job when its link goes down: the job comes back (ack wait) to host3's prefill.

    How host5 comes to hold one for sure: with host3's prefill and the encoder frozen (SIGSTOP, their pulls
    expired), request A's image waits in the encode queue, claimed; request B with the same image goes straight
    to prefill, where the one live prefill worker (host5) takes it and waits for the image being encoded.
    """
    d, image = deployment, png_bytes(color=(200, 40, 160))
    qa, qb, qc = "What colour is it?", "Describe the picture.", "Say something."
    expected = [reference(tiny_model, q, im, MAX_NEW)[1] for q, im in ((qa, image), (qb, image), (qc, None))]
    frozen = [(d.hosts[3], "prefill"), (d.hosts[2], "encode")]

    async def scenario() -> tuple[list[httpx.Response], str]:
        async with httpx.AsyncClient(base_url=d.base_url, timeout=180) as client:
            for host, name in frozen:
                host.procs[name].send_signal(signal.SIGSTOP)
            await asyncio.sleep(1.5)  # their outstanding pulls (1 s) expire: they hold nothing
            a = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(qa, image)))
            await until(lambda: queue_state(d, "EPD_ENCODE", "encode", "pending"), "A's encode job queued")
            b = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(qb, image)))
            await until(lambda: queue_state(d, "EPD_PREFILL", "prefill", "held"), "B held by host5's prefill")
            d.hosts.cut(5)
            for host, name in frozen:
                host.procs[name].send_signal(signal.SIGCONT)
            c = await client.post("/v1/chat/completions", json=chat_body(qc))  # the rest keep serving
            replies = [await a, await b, c]
        return replies, replies[1].json().get("id", "")

    try:
        replies, b_id = d.hosts[1].call(asyncio.run, scenario())
        assert [answer(r) for r in replies] == expected
        b_trace = {s["trace_id"] for s in d.spans() if s["attributes"].get("epd.request_id") == b_id}
        attempts = sorted(
            (s["attributes"]["epd.attempt"], s["host"])
            for s in d.spans()
            if s["trace_id"] in b_trace and s["attributes"].get("epd.stage") == "prefill"
        )
        a = d.hosts.address
        assert attempts[0] == (1, a(5)) and (2, a(3)) in attempts, attempts  # held by host5, redone by host3
        wait_until(lambda: d.workers().get("prefill", 0) == 1, 30, "host5's workers out of the pool")
    finally:
        for host, name in frozen:
            host.procs[name].send_signal(signal.SIGCONT)
        d.hosts.mend(5)
    wait_until(d.ready, 60, "host5's workers back in the pool")
    served = {w: _served(d, w) for w in ("prefill", "decode")}

    def host5_served_more() -> bool:
        """Another round of requests, all answered; then whether host5 has served one of them (a heartbeat
        carries its count within a second). Pull dispatch gives work to whoever asks first: rounds until it."""
        replies = d.chat([chat_body(f"Again {i}.") for i in range(4)])
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        time.sleep(1.5)
        return any(_served(d, w) > served[w] for w in served)

    wait_until(host5_served_more, 120, "host5 taking work after it rejoined")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def queue_state(d: Deployment, stream: str, durable: str, state: str) -> bool:
    """Whether a stage's consumer has a job waiting (`pending`) or delivered and not acked (`held`)."""
    from epd.core.heartbeat import stage_queue
    from epd.core.runtime import connect

    nc = await connect(d.settings, "test")
    try:
        subject = {"EPD_ENCODE": subjects.ENCODE, "EPD_PREFILL": subjects.PREFILL}[stream]
        waiting, working = await stage_queue(nc.jetstream(), stream, durable, subject)
        return (waiting if state == "pending" else working) > 0
    finally:
        await nc.close()


def _served(d: Deployment, role: str) -> int:
    """Requests host5's worker of `role` has served, from its heartbeats in the workers bucket."""

    async def count() -> int:
        from epd.core.heartbeat import live_workers
        from epd.core.runtime import connect

        nc = await connect(d.settings, "test")
        try:
            at = f"//{d.hosts.address(5)}:"  # a worker's metrics URL names the address it advertises
            mine = [w for w in await live_workers(nc.jetstream()) if w.role == role and at in w.metrics_url]
            return sum(w.served for w in mine)
        finally:
            await nc.close()

    return d.hosts[1].call(asyncio.run, count())
