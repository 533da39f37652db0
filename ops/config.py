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

TOPOLOGIES = ("epd", "e-pd", "e-p-d")
ROLES = ("encode", "prefill", "decode", "pd", "epd")
TOPOLOGY_ROLES = {"epd": ("epd",), "e-pd": ("encode", "pd"), "e-p-d": ("encode", "prefill", "decode")}
KV_TRANSFERS = ("direct", "store")  # prefill writes into the decoder's memory, or through Mooncake Store
EC_BACKENDS = ("mooncake", "shared-dir")  # the aggregated epd topology keeps embeddings in its process
DTYPES = ("float32", "bfloat16", "float16")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


# The demo checkpoint that ships with the project (trained by `python -m epd.ops.demo_model`).
DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "epd-demo-qwen2-vl"


def default_model_dir() -> Path:
    return Path(_env("EPD_MODEL", str(DEMO_MODEL)))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a process of epd reads. Validated on construction."""

    model: Path = field(default_factory=default_model_dir)
    served_model_name: str = field(default_factory=lambda: _env("EPD_SERVED_MODEL_NAME", ""))
    topology: str = field(default_factory=lambda: _env("EPD_TOPOLOGY", "e-p-d"))
    nats_url: str = field(default_factory=lambda: _env("EPD_NATS_URL", ""))
    mooncake_master: str = field(default_factory=lambda: _env("EPD_MOONCAKE_MASTER", ""))
    mooncake_metadata: str = field(default_factory=lambda: _env("EPD_MOONCAKE_METADATA", ""))
    mooncake_segment_mb: int = field(default_factory=lambda: int(_env("EPD_MOONCAKE_SEGMENT_MB", "256")))
    bind_host: str = field(default_factory=lambda: _env("EPD_BIND_HOST", "127.0.0.1"))
    advertise_host: str = field(default_factory=lambda: _env("EPD_ADVERTISE_HOST", ""))
    host: str = field(default_factory=lambda: _env("EPD_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: int(_env("EPD_PORT", "8000")))
    device: str = field(default_factory=lambda: _env("EPD_DEVICE", "cpu"))
    dtype: str = field(default_factory=lambda: _env("EPD_DTYPE", "float32"))
    request_timeout_s: float = field(default_factory=lambda: float(_env("EPD_REQUEST_TIMEOUT_S", "300")))
    ack_wait_s: float = field(default_factory=lambda: float(_env("EPD_ACK_WAIT_S", "30")))
    max_deliver: int = field(default_factory=lambda: int(_env("EPD_MAX_DELIVER", "3")))
    trace_dir: str = field(default_factory=lambda: _env("EPD_TRACE_DIR", ""))
    api_keys: str = field(default_factory=lambda: _env("EPD_API_KEYS", ""))  # comma-separated; empty: no auth
    max_body_mb: float = field(default_factory=lambda: float(_env("EPD_MAX_BODY_MB", "32")))
    max_images: int = field(default_factory=lambda: int(_env("EPD_MAX_IMAGES", "8")))
    max_image_mb: float = field(default_factory=lambda: float(_env("EPD_MAX_IMAGE_MB", "20")))
    image_url_hosts: str = field(default_factory=lambda: _env("EPD_IMAGE_URL_HOSTS", ""))  # empty: remote URLs off
    image_url_timeout_s: float = field(default_factory=lambda: float(_env("EPD_IMAGE_URL_TIMEOUT_S", "5")))
    max_image_pixels: int = field(default_factory=lambda: int(_env("EPD_MAX_IMAGE_PIXELS", str(4096 * 4096))))
    inline_encode: bool = field(  # prefill encodes itself when no encoder is alive or an encode times out
        default_factory=lambda: _env("EPD_INLINE_ENCODE", "fallback").lower() not in ("off", "0", "false")
    )
    encode_wait_s: float = field(default_factory=lambda: float(_env("EPD_ENCODE_WAIT_S", "30")))
    image_ttl_s: float = field(default_factory=lambda: float(_env("EPD_IMAGE_TTL_S", "3600")))
    max_inflight: int = field(default_factory=lambda: int(_env("EPD_MAX_INFLIGHT", "256")))
    pool_grace_s: float = field(default_factory=lambda: float(_env("EPD_POOL_GRACE_S", "10")))
    ec_backend: str = field(default_factory=lambda: _env("EPD_EC_BACKEND", "mooncake"))
    ec_dir: str = field(default_factory=lambda: _env("EPD_EC_DIR", ""))
    ec_capacity_mb: float = field(default_factory=lambda: float(_env("EPD_EC_CAPACITY_MB", "4096")))
    verify_checksums: bool = field(  # XXH3-64 of every embedding and KV loaded (size, shape, dtype: always)
        default_factory=lambda: _env("EPD_VERIFY_CHECKSUMS", "on").lower() not in ("off", "0", "false")
    )
    kv_cache_mb: float = field(default_factory=lambda: float(_env("EPD_KV_CACHE_MB", "512")))
    kv_transfer: str = field(default_factory=lambda: _env("EPD_KV_TRANSFER", "direct"))
    kv_buffer_mb: float = field(default_factory=lambda: float(_env("EPD_KV_BUFFER_MB", "256")))
    kv_reserve_timeout_s: float = field(default_factory=lambda: float(_env("EPD_KV_RESERVE_TIMEOUT_S", "30")))
    max_seqs: int = field(default_factory=lambda: int(_env("EPD_MAX_SEQS", "64")))
    max_batch: int = field(default_factory=lambda: int(_env("EPD_MAX_BATCH", "8")))
    max_tokens_limit: int = field(default_factory=lambda: int(_env("EPD_MAX_TOKENS", "4096")))
    nats_creds: str = field(default_factory=lambda: _env("EPD_NATS_CREDS", ""))
    nats_user: str = field(default_factory=lambda: _env("EPD_NATS_USER", ""))
    nats_password: str = field(default_factory=lambda: _env("EPD_NATS_PASSWORD", ""))
    nats_token: str = field(default_factory=lambda: _env("EPD_NATS_TOKEN", ""))
    nats_tls_ca: str = field(default_factory=lambda: _env("EPD_NATS_TLS_CA", ""))
    nats_tls_cert: str = field(default_factory=lambda: _env("EPD_NATS_TLS_CERT", ""))
    nats_tls_key: str = field(default_factory=lambda: _env("EPD_NATS_TLS_KEY", ""))
    tracing: bool = field(default_factory=lambda: _env("EPD_TRACING", "on").lower() not in ("off", "0", "false"))
    trace_sample_ratio: float = field(default_factory=lambda: float(_env("EPD_TRACE_SAMPLE_RATIO", "1.0")))
    metrics_port: int = field(default_factory=lambda: int(_env("EPD_METRICS_PORT", "0")))

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology {self.topology!r} is not one of {', '.join(TOPOLOGIES)}")
        if self.ec_backend not in EC_BACKENDS:
            raise ValueError(f"encoder-cache backend {self.ec_backend!r} is not one of {', '.join(EC_BACKENDS)}")
        if self.ec_backend == "shared-dir" and not self.ec_dir:
            raise ValueError("EPD_EC_BACKEND=shared-dir needs EPD_EC_DIR, a directory every worker mounts")
        if self.kv_transfer not in KV_TRANSFERS:
            raise ValueError(f"KV transfer {self.kv_transfer!r} is not one of {', '.join(KV_TRANSFERS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range 1..65535")
        if self.mooncake_segment_mb < 0:
            raise ValueError(f"mooncake segment size {self.mooncake_segment_mb} MB is negative")
        if self.max_deliver < 1:
            raise ValueError(f"max_deliver {self.max_deliver} must be at least 1")
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
        out = {
            "EPD_MODEL": str(self.model),
            "EPD_TOPOLOGY": self.topology,
            "EPD_NATS_URL": self.nats_url,
            "EPD_MOONCAKE_MASTER": self.mooncake_master,
            "EPD_MOONCAKE_METADATA": self.mooncake_metadata,
            "EPD_MOONCAKE_SEGMENT_MB": str(self.mooncake_segment_mb),
            "EPD_BIND_HOST": self.bind_host,
            "EPD_ADVERTISE_HOST": self.advertise_host,
            "EPD_HOST": self.host,
            "EPD_PORT": str(self.port),
            "EPD_DEVICE": self.device,
            "EPD_DTYPE": self.dtype,
            "EPD_REQUEST_TIMEOUT_S": str(self.request_timeout_s),
            "EPD_ACK_WAIT_S": str(self.ack_wait_s),
            "EPD_MAX_DELIVER": str(self.max_deliver),
            "EPD_TRACE_DIR": self.trace_dir,
            "EPD_API_KEYS": self.api_keys,
            "EPD_MAX_BODY_MB": str(self.max_body_mb),
            "EPD_MAX_IMAGES": str(self.max_images),
            "EPD_MAX_IMAGE_PIXELS": str(self.max_image_pixels),
            "EPD_MAX_IMAGE_MB": str(self.max_image_mb),
            "EPD_IMAGE_URL_HOSTS": self.image_url_hosts,
            "EPD_IMAGE_URL_TIMEOUT_S": str(self.image_url_timeout_s),
            "EPD_MAX_TOKENS": str(self.max_tokens_limit),
            "EPD_EC_BACKEND": self.ec_backend,
            "EPD_EC_DIR": self.ec_dir,
            "EPD_EC_CAPACITY_MB": str(self.ec_capacity_mb),
            "EPD_VERIFY_CHECKSUMS": "on" if self.verify_checksums else "off",
            "EPD_KV_CACHE_MB": str(self.kv_cache_mb),
            "EPD_KV_TRANSFER": self.kv_transfer,
            "EPD_KV_BUFFER_MB": str(self.kv_buffer_mb),
            "EPD_KV_RESERVE_TIMEOUT_S": str(self.kv_reserve_timeout_s),
            "EPD_MAX_SEQS": str(self.max_seqs),
            "EPD_MAX_BATCH": str(self.max_batch),
            "EPD_MAX_INFLIGHT": str(self.max_inflight),
            "EPD_ENCODE_WAIT_S": str(self.encode_wait_s),
            "EPD_IMAGE_TTL_S": str(self.image_ttl_s),
            "EPD_INLINE_ENCODE": "fallback" if self.inline_encode else "off",
            "EPD_POOL_GRACE_S": str(self.pool_grace_s),
            "EPD_NATS_CREDS": self.nats_creds,
            "EPD_NATS_USER": self.nats_user,
            "EPD_NATS_PASSWORD": self.nats_password,
            "EPD_NATS_TOKEN": self.nats_token,
            "EPD_NATS_TLS_CA": self.nats_tls_ca,
            "EPD_NATS_TLS_CERT": self.nats_tls_cert,
            "EPD_NATS_TLS_KEY": self.nats_tls_key,
            "EPD_TRACING": "on" if self.tracing else "off",
            "EPD_TRACE_SAMPLE_RATIO": str(self.trace_sample_ratio),
            "EPD_METRICS_PORT": str(self.metrics_port),
        }
        if self.served_model_name:
            out["EPD_SERVED_MODEL_NAME"] = self.served_model_name
        return out
