"""Every setting in one frozen place: name, environment variable, default.

The CLI's flags default to the environment, so `epd up`, `epd worker` and the
docker-compose services share one configuration surface (see README's table).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOPOLOGIES = ("epd", "e-pd", "e-p-d")
ROLES = ("encode", "prefill", "decode", "pd", "epd")
TOPOLOGY_ROLES = {"epd": ("epd",), "e-pd": ("encode", "pd"), "e-p-d": ("encode", "prefill", "decode")}
KV_TRANSFERS = ("direct", "store")  # prefill writes into the decoder's memory, or through Mooncake Store
ENGINES = ("epd", "vllm")  # vllm: workers/vllm_engine.py, vllm_encode.py, in vLLM's own environment (make test-vllm)
EC_BACKENDS = ("mooncake", "shared-dir")  # the aggregated epd topology keeps embeddings in its process
DTYPES = ("float32", "bfloat16", "float16")
# image preprocessing: transformers' image processor (PIL, on the CPU), torch operations on the tower's device
# (workers/engine/image_preprocess.py), or auto: torch where the tower runs on CUDA, the processor elsewhere
PREPROCESS = ("auto", "processor", "torch")


class SettingError(ValueError):
    """A setting's value that cannot be read; the message names the variable and the value."""


def parse(env: str, raw: str, kind: type, words: tuple[str, str] = ("on", "off")) -> Any:
    """`raw` as `kind`; a SettingError naming `env` and the value if it is not one."""
    if kind is bool:
        value = raw.strip().lower()
        if value in (words[0], "on", "1", "true", "yes"):
            return True
        if value in (words[1], "off", "0", "false", "no"):
            return False
        raise SettingError(f"{env}={raw!r} is not {words[0]} or {words[1]}")
    try:
        return kind(raw)
    except ValueError:
        raise SettingError(f"{env}={raw!r} is not a valid {kind.__name__}") from None


def setting(
    env: str,
    default: Any,
    help: str,  # noqa: A002 - argparse's word
    flag: bool = False,
    choices: tuple[str, ...] | None = None,
    words: tuple[str, str] = ("on", "off"),
) -> Any:
    """One setting, declared once. Its environment variable, default and help drive the field's default (the
    variable when set), `Settings.env()`, and with `flag` the CLI's `--name`. `words`: a bool's two spellings."""
    kind = Path if isinstance(default, Path) else type(default)

    def read() -> Any:
        return parse(env, os.environ[env], kind, words) if env in os.environ else default

    meta = {"env": env, "help": help, "flag": flag, "choices": choices, "words": words, "kind": kind}
    return field(default_factory=read, metadata=meta)


# The demo checkpoint that ships with the project (trained by `python -m epd.tools.demo_model`).
DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "epd-demo-qwen2-vl"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a process of epd reads, each setting declared once (`setting`). Validated on construction."""

    model: Path = setting("EPD_MODEL", DEMO_MODEL, "checkpoint directory", flag=True)
    served_model_name: str = setting(
        "EPD_SERVED_MODEL_NAME", "", "name clients use (default: the folder's name)", flag=True
    )
    topology: str = setting("EPD_TOPOLOGY", "e-p-d", "epd, e-pd or e-p-d", flag=True, choices=TOPOLOGIES)
    nats_url: str = setting(
        "EPD_NATS_URL", "", "an existing NATS server, or a cluster's, comma-separated (default: embedded)", flag=True
    )
    nats_cluster: int = setting("EPD_NATS_CLUSTER", 0, "nodes of the embedded NATS cluster (0: one server)", flag=True)
    nats_replicas: int = setting("EPD_NATS_REPLICAS", 1, "JetStream replicas of epd's streams and buckets (1..5)")
    mooncake_master: str = setting("EPD_MOONCAKE_MASTER", "", "an existing Mooncake master host:port", flag=True)
    mooncake_metadata: str = setting("EPD_MOONCAKE_METADATA", "", "its HTTP metadata URL", flag=True)
    mooncake_segment_mb: int = setting("EPD_MOONCAKE_SEGMENT_MB", 256, "memory each worker lends to the store")
    bind_host: str = setting("EPD_BIND_HOST", "127.0.0.1", "address Mooncake's sockets and worker metrics bind")
    advertise_host: str = setting("EPD_ADVERTISE_HOST", "", "address other processes reach this one at")
    host: str = setting("EPD_HOST", "127.0.0.1", "HTTP bind address", flag=True)
    port: int = setting("EPD_PORT", 8000, "HTTP port", flag=True)
    device: str = setting("EPD_DEVICE", "cpu", "cpu, cuda:N or npu:N", flag=True)
    dtype: str = setting("EPD_DTYPE", "float32", "weights dtype", flag=True, choices=DTYPES)
    request_timeout_s: float = setting("EPD_REQUEST_TIMEOUT_S", 300.0, "HTTP request deadline (504 after)")
    ack_wait_s: float = setting(
        "EPD_ACK_WAIT_S", 5.0, "JetStream redelivery wait: a job whose worker died goes to another after it"
    )
    max_deliver: int = setting("EPD_MAX_DELIVER", 3, "deliveries of a job at most")
    trace_dir: str = setting("EPD_TRACE_DIR", "", "write spans as JSON lines here", flag=True)
    api_keys: str = setting("EPD_API_KEYS", "", "comma-separated API keys (empty: no auth)")
    max_body_mb: float = setting("EPD_MAX_BODY_MB", 32.0, "request body limit (413 over it)")
    max_images: int = setting("EPD_MAX_IMAGES", 8, "images per request (413 over it)")
    max_image_mb: float = setting("EPD_MAX_IMAGE_MB", 20.0, "encoded bytes per image (413)")
    image_url_hosts: str = setting("EPD_IMAGE_URL_HOSTS", "", "hosts image URLs may come from (empty: remote URLs off)")
    image_url_timeout_s: float = setting("EPD_IMAGE_URL_TIMEOUT_S", 5.0, "time limit of one image fetch")
    max_image_pixels: int = setting("EPD_MAX_IMAGE_PIXELS", 4096 * 4096, "pixels per image (413)")
    inline_encode: bool = setting(  # prefill encodes itself when no encoder is alive or an encode times out
        "EPD_INLINE_ENCODE",
        True,
        "prefill encodes when no encoder is alive (fallback), or never (off)",
        words=("fallback", "off"),
    )
    encode_wait_s: float = setting("EPD_ENCODE_WAIT_S", 30.0, "how long prefill waits for an image being encoded")
    image_ttl_s: float = setting("EPD_IMAGE_TTL_S", 3600.0, "how long the image store keeps a request's images")
    max_inflight: int = setting("EPD_MAX_INFLIGHT", 256, "HTTP requests in flight per gateway (429 over it)")
    pool_grace_s: float = setting("EPD_POOL_GRACE_S", 10.0, "a stage without live workers this long: 503")
    engine: str = setting(
        "EPD_ENGINE", "epd", "the encode, pd and epd workers' engine: epd's or vLLM's", flag=True, choices=ENGINES
    )
    encode_engine: str = setting(
        "EPD_ENCODE_ENGINE", "", "the encoders' engine, if not --engine's", flag=True, choices=("", *ENGINES)
    )
    ec_backend: str = setting("EPD_EC_BACKEND", "mooncake", "the shared encoder cache", choices=EC_BACKENDS)
    ec_dir: str = setting("EPD_EC_DIR", "", "the shared-dir encoder cache's directory")
    ec_capacity_mb: float = setting("EPD_EC_CAPACITY_MB", 4096.0, "bound of the shared-dir and in-process caches")
    verify_checksums: bool = setting("EPD_VERIFY_CHECKSUMS", True, "check every embedding and KV block loaded")
    kv_cache_mb: float = setting("EPD_KV_CACHE_MB", 512.0, "the KV cache a decoding worker preallocates")
    kv_transfer: str = setting("EPD_KV_TRANSFER", "direct", "how prefill hands KV over", choices=KV_TRANSFERS)
    kv_buffer_mb: float = setting("EPD_KV_BUFFER_MB", 256.0, "registered buffer for direct KV transfers")
    kv_reserve_timeout_s: float = setting("EPD_KV_RESERVE_TIMEOUT_S", 30.0, "KV room granted is freed after this")
    max_seqs: int = setting("EPD_MAX_SEQS", 64, "sequences in one decoder's continuous batch")
    max_batch: int = setting("EPD_MAX_BATCH", 8, "requests in one encode or prefill forward")
    image_preprocess: str = setting(
        "EPD_IMAGE_PREPROCESS",
        "auto",
        "image preprocessing: processor (PIL, CPU), torch (on the tower's device), auto (torch on CUDA)",
        choices=PREPROCESS,
    )
    max_tokens_limit: int = setting("EPD_MAX_TOKENS", 4096, "the largest max_tokens a request may ask")
    nats_creds: str = setting("EPD_NATS_CREDS", "", "NATS credentials file (JWT and NKey)")
    nats_user: str = setting("EPD_NATS_USER", "", "NATS user")
    nats_password: str = setting("EPD_NATS_PASSWORD", "", "NATS password")
    nats_token: str = setting("EPD_NATS_TOKEN", "", "NATS token")
    nats_tls_ca: str = setting("EPD_NATS_TLS_CA", "", "CA bundle for TLS to NATS")
    nats_tls_cert: str = setting("EPD_NATS_TLS_CERT", "", "client certificate for TLS to NATS")
    nats_tls_key: str = setting("EPD_NATS_TLS_KEY", "", "its key")
    tracing: bool = setting("EPD_TRACING", True, "tracing on or off")
    trace_sample_ratio: float = setting("EPD_TRACE_SAMPLE_RATIO", 1.0, "share of requests traced")
    metrics_port: int = setting("EPD_METRICS_PORT", 0, "a worker's Prometheus port (-1 off, 0 a free port)")

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology {self.topology!r} is not one of {', '.join(TOPOLOGIES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.encode_engine not in ("", *ENGINES):
            raise ValueError(f"encode engine {self.encode_engine!r} is not one of {', '.join(ENGINES)}")
        if self.ec_backend not in EC_BACKENDS:
            raise ValueError(f"encoder-cache backend {self.ec_backend!r} is not one of {', '.join(EC_BACKENDS)}")
        if self.ec_backend == "shared-dir" and not self.ec_dir:
            raise ValueError("EPD_EC_BACKEND=shared-dir needs EPD_EC_DIR, a directory every worker mounts")
        if self.kv_transfer not in KV_TRANSFERS:
            raise ValueError(f"KV transfer {self.kv_transfer!r} is not one of {', '.join(KV_TRANSFERS)}")
        if self.image_preprocess not in PREPROCESS:
            raise ValueError(f"image preprocessing {self.image_preprocess!r} is not one of {', '.join(PREPROCESS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range 1..65535")
        if self.mooncake_segment_mb < 0:
            raise ValueError(f"mooncake segment size {self.mooncake_segment_mb} MB is negative")
        if self.max_deliver < 1:
            raise ValueError(f"max_deliver {self.max_deliver} must be at least 1")
        if not 1 <= self.nats_replicas <= 5:
            raise ValueError(f"EPD_NATS_REPLICAS={self.nats_replicas}: JetStream keeps 1 to 5 replicas")
        if self.nats_cluster < 0:
            raise ValueError(f"EPD_NATS_CLUSTER={self.nats_cluster} is negative")
        if not 0 <= self.trace_sample_ratio <= 1:
            raise ValueError(f"trace sample ratio {self.trace_sample_ratio} is not in [0, 1]")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError(f"metrics port {self.metrics_port} is out of range (-1 off, 0 any free port)")
        for name in (
            "max_body_mb",
            "max_images",
            "max_image_pixels",
            "max_image_mb",
            "max_tokens_limit",
            "kv_cache_mb",
            "kv_buffer_mb",
            "kv_reserve_timeout_s",
            "ec_capacity_mb",
            "max_seqs",
            "max_batch",
            "image_url_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ValueError("EPD_NATS_TLS_CERT and EPD_NATS_TLS_KEY go together")
        object.__setattr__(self, "model", Path(self.model))

    @property
    def reachable_host(self) -> str:
        """The address other processes reach this one's listeners at (Mooncake segments, metrics).

        `EPD_ADVERTISE_HOST`, else the bind address, else (bound to every interface) this host's address.
        """
        if self.advertise_host:
            return self.advertise_host
        if self.bind_host not in ("0.0.0.0", "::"):
            return self.bind_host
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"

    @property
    def nats_servers(self) -> list[str]:
        """EPD_NATS_URL's URLs: one server, or the nodes of a cluster."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def tcp_bind_address(self) -> str:
        """MC_TCP_BIND_ADDRESS: Mooncake's TCP transport binds it and also advertises it to its peers, so
        "any" (0.0.0.0, as in containers) becomes the reachable address, which peers can connect to."""
        return self.reachable_host if self.bind_host in ("0.0.0.0", "::") else self.bind_host

    def engine_for(self, role: str) -> str:
        """The engine a role's worker runs: vLLM where asked and where epd has a vLLM path (encode, pd, epd);
        prefill and decode always run epd's (their KV moves over epd's connectors)."""
        if role == "encode":
            return self.encode_engine or self.engine
        return self.engine if role in ("pd", "epd") else "epd"

    @property
    def required_roles(self) -> tuple[str, ...]:
        """Roles without which the topology cannot serve: encoders are optional when prefill may encode."""
        roles = TOPOLOGY_ROLES[self.topology]
        return tuple(r for r in roles if not (r == "encode" and self.inline_encode))

    @property
    def image_url_host_set(self) -> frozenset[str]:
        return frozenset(h.strip() for h in self.image_url_hosts.split(",") if h.strip())

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def model_name(self) -> str:
        """The name clients put in `model`: the flag, else the checkpoint folder's name."""
        return self.served_model_name or self.model.name

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)

    def env(self) -> dict[str, str]:
        """The settings as environment variables, for child processes."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.metadata["env"]] = f.metadata["words"][not value] if isinstance(value, bool) else str(value)
        return out

    @classmethod
    def flags(cls) -> list[dataclasses.Field]:
        """The settings that are also CLI flags (`--name-with-dashes`)."""
        return [f for f in dataclasses.fields(cls) if f.metadata["flag"]]


MOONCAKE_BIND_ENV = "MC_TCP_BIND_ADDRESS"


def export_mooncake_env(settings: Settings) -> None:
    """At a process's entry, before any Mooncake client starts: Mooncake's TCP transport reads the address it binds
    and advertises from the environment only (neither the store's `setup`, its config dict, nor the engine's
    `initialize` takes it). Set from this process's own settings, even over an inherited value: a worker that
    inherited its launcher's address advertised that one, and its peers found nothing there."""
    os.environ[MOONCAKE_BIND_ENV] = settings.tcp_bind_address


def check_mooncake_env(settings: Settings) -> None:
    """What a Mooncake client checks before it starts: the environment names this process's own address."""
    found = os.environ.get(MOONCAKE_BIND_ENV)
    if found != settings.tcp_bind_address:
        raise ValueError(
            f"{MOONCAKE_BIND_ENV} is {found!r}, not this process's address {settings.tcp_bind_address!r} "
            f"(EPD_BIND_HOST): Mooncake would advertise the wrong one. A process sets it at its entry "
            "(epd.core.config.export_mooncake_env)"
        )
