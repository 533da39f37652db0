"""docker-compose.yml as Compose reads it (`docker compose config`, no engine needed): valid against the Compose
Specification, consistent with the project (commands, variables, healthchecks, files), and its own commands
serve a request as local processes, with loopback in place of the service host names. The file itself holds no
YAML anchors or merge keys, which YAML parsers resolve differently. tests/test_compose_up.py runs it on an engine."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from epd.core.config import Settings
from epd.ops.cli import parser
from epd.ops.processes import find_binary, free_port, spawn, stop

from .conftest import Received, chat_body, png_bytes
from .docker_stack import compose_config
from .oracle import reference

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SPEC = ROOT.parent / "shared" / "compose-spec.json"  # the official schema, kept beside the repository
# the OTEL_* variables epd's processes honour (through the OpenTelemetry SDK)
OTEL_VARS = {
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
}
WORKERS = ("encoder", "prefill", "decode")


def compose() -> dict:
    """The default services (no profile), as Compose resolves them."""
    return compose_config()


def with_gpu() -> dict:
    return compose_config("gpu")


def ours(services: dict) -> dict:
    """The services that run the epd image."""
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith("epd:")}


def settings_vars() -> set[str]:
    return set(Settings(served_model_name="x").env())


@pytest.mark.unit
def test_valid_against_the_compose_specification() -> None:
    spec = jsonschema.Draft7Validator(json.loads(SPEC.read_text()))
    spec.validate(yaml.safe_load(COMPOSE_FILE.read_text()))  # the file as written
    spec.validate(with_gpu())  # and as Compose resolves it, every profile included


@pytest.mark.unit
def test_no_yaml_anchors_or_merge_keys() -> None:
    """Parsers disagree on merge-key precedence (PyYAML 6.0.4 gave the GPU services `VARIANT: cpu`): Compose's own
    `extends` says what a service shares, and every parser reads the same values."""
    events = list(yaml.parse(COMPOSE_FILE.read_text()))
    assert not [e for e in events if getattr(e, "anchor", None) or isinstance(e, yaml.AliasEvent)]
    assert "<<" not in {e.value for e in events if isinstance(e, yaml.ScalarEvent)}


@pytest.mark.unit
def test_the_nats_cluster_override_gives_every_process_three_nodes_and_three_replicas() -> None:
    override = COMPOSE_FILE.parent / "ops" / "compose.nats-cluster.yml"
    services = compose_config("gpu", overrides=(override,))["services"]
    nodes = ["nats", "nats-2", "nats-3"]
    for name in nodes:  # each node names itself and routes to the other two
        cmd = services[name]["command"]
        routes = cmd[cmd.index("--routes") + 1].split(",")
        assert sorted(r.split("//")[1].split(":")[0] for r in routes) == sorted(set(nodes) - {name})
        assert cmd[cmd.index("--cluster_name") + 1] == "epd"
    assert len({services[n]["command"][services[n]["command"].index("--name") + 1] for n in nodes}) == 3
    epd = [n for n, s in services.items() if s.get("image", "").startswith("epd:") and n != "mooncake-master"]
    assert len(epd) == 7  # gateway and the six worker services
    for name in epd:
        env = services[name]["environment"]
        assert env["EPD_NATS_URL"].split(",") == [f"nats://{n}:4222" for n in nodes], name
        assert env["EPD_NATS_REPLICAS"] == "3", name
        assert {"nats-2", "nats-3"} <= set(services[name]["depends_on"]), name


def test_structure_matches_the_project() -> None:
    services = with_gpu()["services"]
    mine = ours(services)
    assert {"gateway", "mooncake-master", *WORKERS} <= set(mine)
    assert {"nats", "jaeger", "prometheus"} <= set(services)
    known = settings_vars() | OTEL_VARS
    cli = parser()
    for name, svc in mine.items():
        cmd = svc["command"]
        assert cmd[0] == "epd", name
        cli.parse_args(cmd[1:])  # exits (fails the test) on a command our CLI does not take
        env = svc.get("environment", {})
        assert set(env) <= known, (name, set(env) - known)
        assert svc.get("init") is True, name  # Python as PID 1 would ignore SIGTERM
        build = svc["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
        test = svc["healthcheck"]["test"]
        assert test[:2] == ["CMD", "epd"], name
        args = cli.parse_args(test[2:])
        port = int(re.search(r":(\d+)/", args.url).group(1))
        listens = {int(p) for p in svc.get("expose", [])} | {int(svc.get("environment", {}).get("EPD_METRICS_PORT", 0))}
        assert port in listens, (name, port, listens)
    for name in WORKERS:  # scalable: no fixed names, no host ports
        assert "container_name" not in services[name] and "ports" not in services[name]
        assert services[name]["healthcheck"]["test"][-1].endswith(":9400/metrics")
    for name, svc in services.items():
        for binding in svc.get("ports", []):
            assert binding["host_ip"] == "127.0.0.1", (name, binding)  # loopback unless the operator says otherwise
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
    # Dockerfile: every COPY source exists, the image runs as a non-root user and has a healthcheck
    dockerfile = (ROOT / "ops" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M) and "HEALTHCHECK" in dockerfile
    assert "ARG VARIANT" in dockerfile  # the GPU variant is a build argument
    gpu = [n for n, s in services.items() if "gpu" in s.get("profiles", [])]
    assert sorted(gpu) == sorted(f"{w}-gpu" for w in WORKERS)
    for name in gpu:
        assert services[name]["build"]["args"]["VARIANT"] == "cuda"
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["capabilities"] == ["gpu"]
    # mounted config files exist; Prometheus scrapes the gateway and every worker service on its metrics port
    for svc in services.values():
        for vol in svc.get("volumes", []):
            if vol["type"] == "bind":
                assert Path(vol["source"]).is_file() and vol.get("read_only"), vol
    prom = yaml.safe_load((ROOT / "ops" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    sd = jobs["workers"]["dns_sd_configs"][0]
    assert set(sd["names"]) == set(WORKERS) and sd["port"] == int(
        services["encoder"]["environment"]["EPD_METRICS_PORT"]
    )
    assert jobs["mooncake-master"]["static_configs"][0]["targets"] == ["mooncake-master:9003"]
    assert "9003" in services["mooncake-master"]["expose"]
    assert "max_payload: 8MB" in (ROOT / "ops" / "nats.conf").read_text()


@pytest.mark.unit
def test_readme_is_the_configuration_surface_and_the_deployment_truth() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ", 1)]
    listed = set(re.findall(r"`(EPD_[A-Z0-9_]+)`", table))
    assert listed == settings_vars(), listed ^ settings_vars()
    deployment = readme[readme.index("## Deployment") :]
    deployment = deployment[: deployment.index("\n## ", 1)]
    services = with_gpu()["services"]
    for name in services:
        assert f"`{name}`" in deployment, name
    for svc in services.values():
        for binding in svc.get("ports", []):
            assert f"127.0.0.1:{binding['published']}" in deployment, binding


# --- the compose topology, run as local processes ---------------------------------------------------------


def depends_order(services: dict) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in services[name].get("depends_on", {}):
                visit(dep)
            order.append(name)

    for name in services:
        visit(name)
    return order


class LocalCompose:
    """Each service's command and environment, with service host names and ports mapped to loopback ones."""

    def __init__(self, services: dict, workdir: Path, model: Path, otlp_url: str) -> None:
        self.services = {n: s for n, s in services.items() if "profiles" not in s}  # no profile: the default set
        self.workdir, self.model, self.otlp_url = workdir, model, otlp_url
        self.ports = {(n, int(p)): free_port() for n, s in self.services.items() for p in s.get("expose", [])}
        self.procs: list = []

    def host_port(self, text: str) -> str:
        """`service:port` anywhere in `text` becomes `127.0.0.1:<its local port>`."""
        for (name, port), local in self.ports.items():
            text = re.sub(rf"\b{re.escape(name)}:{port}\b", f"127.0.0.1:{local}", text)
        return text

    def own_ports(self, name: str, arg: str) -> str:
        for (svc, port), local in self.ports.items():
            if svc == name and arg == str(port):
                return str(local)
        return "127.0.0.1" if arg == "0.0.0.0" else arg

    def env(self, name: str) -> dict[str, str]:
        env = {k: self.host_port(str(v)) for k, v in self.services[name].get("environment", {}).items()}
        env.update(
            EPD_MODEL=str(self.model),
            EPD_BIND_HOST="127.0.0.1",
            EPD_METRICS_PORT="0",  # several workers share this host
            OTEL_EXPORTER_OTLP_ENDPOINT=self.otlp_url,  # in place of Jaeger
            OTEL_BSP_SCHEDULE_DELAY="200",
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith(("EPD_", "OTEL_"))}
        return {**base, **env}

    def argv(self, name: str, cmd: list[str]) -> list[str]:
        assert cmd[0] == "epd"
        return [sys.executable, "-m", "epd.ops.cli", *(self.own_ports(name, a) for a in cmd[1:])]

    def healthy(self, name: str) -> bool:
        test = self.services[name]["healthcheck"]["test"]
        if name == "nats":  # the official image's wget; the same URL through urllib here
            url = self.host_port(test[-1].replace("127.0.0.1", name))
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        url = self.host_port(test[-1].replace("127.0.0.1", name))
        args = self.argv(name, [*test[1:-1], url])
        return subprocess.run(args, env=self.env(name), capture_output=True, timeout=30).returncode == 0

    def start_nats(self) -> None:
        svc = self.services["nats"]
        conf_src = next(v["source"] for v in svc["volumes"] if v["target"].endswith("nats.conf"))
        conf = Path(conf_src).read_text()
        for port in (4222, 8222):
            conf = conf.replace(f"0.0.0.0:{port}", f"127.0.0.1:{self.ports[('nats', port)]}")
        conf = conf.replace('"/data"', json.dumps(str(self.workdir / "jetstream")))
        path = self.workdir / "nats.conf"
        path.write_text(conf)
        self.procs.append(spawn([find_binary("nats-server"), "-c", str(path)], self.workdir / "nats.log"))

    def up(self, timeout_s: float = 240) -> None:
        """Start in dependency order; before a service starts, the dependencies it needs healthy are."""
        skipped = ("jaeger", "prometheus")  # other projects' images: an OTLP receiver stands in for Jaeger
        waited: set[str] = set()
        for name in depends_order(self.services):
            for dep, cond in self.services[name].get("depends_on", {}).items():
                if cond["condition"] == "service_healthy" and dep not in skipped and dep not in waited:
                    self.wait_healthy(dep, timeout_s)
                    waited.add(dep)
            if name in skipped:
                continue
            if name == "nats":
                self.start_nats()
            else:
                argv = self.argv(name, self.services[name]["command"])
                self.procs.append(spawn(argv, self.workdir / f"{name}.log", env=self.env(name)))

    def wait_healthy(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy(name):
            assert all(p.poll() is None for p in self.procs), f"a process died while {name} started"
            assert time.monotonic() < deadline, f"{name} never became healthy"
            time.sleep(0.5)

    def down(self) -> None:
        stop(list(reversed(self.procs)))


@pytest.fixture
def local_compose(tiny_model: Path, tmp_path: Path, otlp_http: tuple[str, Received]) -> Iterator[LocalCompose]:
    lc = LocalCompose(compose()["services"], tmp_path, tiny_model, otlp_http[0])
    try:
        lc.up()
        yield lc
    finally:
        lc.down()


@pytest.mark.e2e
def test_the_compose_commands_serve_a_request(
    local_compose: LocalCompose, tiny_model: Path, otlp_http: tuple[str, Received]
) -> None:
    gateway = f"http://127.0.0.1:{local_compose.ports[('gateway', 8000)]}"
    image = png_bytes(size=(90, 70), color=(200, 30, 200), shape="circle")
    _, expected = reference(tiny_model, "What color is the shape?", image, 12)
    r = httpx.post(gateway + "/v1/chat/completions", json=chat_body("What color is the shape?", image), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
    # Prometheus's static target answers; its trace reached the OTLP endpoint (Jaeger's place) from every process
    prom = yaml.safe_load((ROOT / "ops" / "prometheus.yml").read_text())
    target = local_compose.host_port(prom["scrape_configs"][0]["static_configs"][0]["targets"][0])
    assert "epd_requests_total" in httpx.get(f"http://{target}/metrics", timeout=10).text
    got = otlp_http[1]
    wanted = {"epd-gateway", "epd-encode", "epd-prefill", "epd-decode"}
    deadline = time.monotonic() + 30
    while not wanted <= got.services and time.monotonic() < deadline:
        time.sleep(0.2)
    assert wanted <= got.services
