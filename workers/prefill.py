"""Prefill stage: embeddings in, prompt through the language model, first token out, KV handed to decode."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from epd.connectors.ec import ECConnector
from epd.connectors.image_store import ImageStore
from epd.connectors.kv import KVConnector
from epd.connectors.kv_direct import KVSender, LayerWriter
from epd.connectors.transfer_engine import TransferError
from epd.core import metrics, subjects
from epd.core.runtime import Runtime
from epd.core.tracing import tracer
from epd.schemas.common import ImageEmbedding
from epd.schemas.decode import KVReady
from epd.schemas.encode import EmbeddingReady, EncodeJob
from epd.schemas.prefill import PrefillJob
from epd.schemas.request import Request
from epd.workers.decode import Decoder, Generation, chunk, prime_text
from epd.workers.decode_batch import finish_reason
from epd.workers.decoder_choice import DecoderPicker
from epd.workers.encode import FamilyEncoder, ImageEncoder
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.detokenizer import Detokenizer
from epd.workers.engine.family import Encoded, Family, Prefilled
from epd.workers.engine.kv_cache import KVLayout
from epd.workers.engine.prompt import PromptError, build_prompt
from epd.workers.engine.sampling import sample
from epd.workers.engine.stops import StopStrings
from epd.workers.errors import RequestFailed
from epd.workers.micro_batch import MicroBatcher
from opentelemetry.trace import Status, StatusCode

log = logging.getLogger(__name__)

PREFILL_BATCH_TOKENS = 16384


class Handoff(Protocol):
    """Where decoding continues after prefill."""

    async def open(self, request_id: str, prompt_tokens: int, max_tokens: int) -> LayerWriter | None:
        """Before the forward: a writer that ships each layer's KV as it is computed, or None."""

    async def __call__(self, gen: Generation, out: Prefilled, writer: LayerWriter | None) -> None:
        """After the first token: hand the request over (`writer` is what `open` gave)."""


class PrefillStage:
    name = "prefill"
    subject = subjects.PREFILL
    message_type = PrefillJob | EmbeddingReady

    def __init__(
        self,
        rt: Runtime,
        ckpt: Checkpoint,
        family: Family,
        ec: ECConnector,
        handoff: Handoff,
        inline_encode: bool = False,
    ) -> None:
        self.rt, self.ckpt, self.family, self.ec = rt, ckpt, family, ec
        self.handoff, self.inline_encode = handoff, inline_encode
        self.capacity = rt.settings.max_batch  # a slot per request that may share a forward
        self.eos = ckpt.eos_token_ids()
        self.max_len = ckpt.max_model_len()
        images = ImageStore(rt.js, rt.settings.image_ttl_s)
        producer = FamilyEncoder(family, ec, rt.settings.max_batch)
        self.encoder = ImageEncoder(producer, ec, images, rt.landed)  # inline encoding
        # padded tokens in one forward at most: a long prompt is not batched with short ones
        self.batcher = MicroBatcher(
            self._forward,
            rt.settings.max_batch,
            "prefill",
            cost=lambda prompts: len(prompts) * max(len(ids) for ids, _, _ in prompts),
            max_cost=PREFILL_BATCH_TOKENS,
        )

    def _forward(self, prompts: list[tuple[list[int], list[Encoded], LayerWriter | None]]) -> list[Prefilled]:
        return self.family.prefill_batch([(ids, images) for ids, images, _ in prompts], [w for *_, w in prompts])

    async def handle(self, job: PrefillJob | EmbeddingReady) -> None:
        req = job.request
        if req.request_id in self.rt.cancelled:
            return
        images = await self._embeddings(job)
        if images is None:  # sent back to the encoders
            return
        try:
            n_image_tokens = [self.family.image_tokens(im.grid_thw) for im in images]
            if req.prompt is not None:
                ids = self.ckpt.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
            else:
                ids = build_prompt(
                    self.ckpt.tokenizer,
                    self.ckpt.chat_template,
                    req.messages,
                    n_image_tokens,
                    self.family.image_token_id,
                )
            if not ids:
                raise PromptError("the prompt is empty")
            ids = ids + list(req.resume_tokens)  # a continuation goes on from what it generated
        except PromptError as e:
            raise RequestFailed(400, str(e)) from None
        if len(ids) >= self.max_len:
            raise RequestFailed(400, f"prompt is {len(ids)} tokens; the model's maximum length is {self.max_len}")
        writer = await self.handoff.open(req.request_id, len(ids), req.sampling.max_tokens)
        handed_over = False
        try:
            handed_over = await self._prefill(req, ids, images, writer)
        finally:
            if writer is not None and not handed_over:  # (the decoder frees the room it granted)
                await writer.abort()

    async def _prefill(self, req: Request, ids: list[int], images: list[Encoded], writer: LayerWriter | None) -> bool:
        """The forward and the first token; True if the request was handed over to decoding."""
        with tracer().start_as_current_span(
            "prefill.forward",
            attributes={
                "gen_ai.request.model": req.model,
                "gen_ai.usage.input_tokens": len(ids),
                "epd.images": len(images),
                "epd.kv_layerwise": writer is not None,
            },
        ) as span:
            out, batch = await self.batcher.submit((ids, images, writer))
            span.set_attribute("epd.batch", batch)
        first = sample(out.logits, req.sampling, len(ids))
        gen = Generation(
            req.request_id,
            req.reply_to,
            req.sampling,
            len(ids),
            [first],
            Detokenizer(self.ckpt.tokenizer),
            StopStrings(req.sampling.stop),
            resumed=list(req.resume_tokens),
        )
        prime_text(gen, gen.resumed)  # a continuation's text goes on from where its client has it
        reason = finish_reason(first, 1, len(ids) + 1, req.sampling, self.eos, self.max_len)
        reply = chunk(gen, 0, first, reason)
        await self.rt.reply(req.reply_to, reply)
        if reply.finish_reason is not None:
            return False
        await self.handoff(gen, out, writer)
        return True

    async def _embeddings(self, job: PrefillJob | EmbeddingReady) -> list[Encoded] | None:
        """Every image's embedding, from the cache or encoded inline; None if re-routed to encoders."""
        refs: list[ImageEmbedding] = job.images
        loaded: list[Encoded | None] = []
        with tracer().start_as_current_span("ec.load", attributes={"epd.images": len(refs)}) as span:
            hits = await self.ec.load_many([ref.key for ref in refs]) if refs else []
            nbytes = sum(h[0].numel() * h[0].element_size() for h in hits if h is not None)
            span.set_attribute("epd.hits", sum(h is not None for h in hits))
            span.set_attribute("epd.bytes", nbytes)
            metrics.CONNECTOR_BYTES.labels("ec", "load").inc(nbytes)
        for hit in hits:
            metrics.EC_LOOKUPS.labels("prefill", "miss" if hit is None else "hit").inc()
            if hit is None:
                self.rt.load.ec_misses += 1
            else:
                self.rt.load.ec_hits += 1
            loaded.append(None if hit is None else Encoded(*hit))
        missing = [i for i, e in enumerate(loaded) if e is None]
        if missing and (isinstance(job, EmbeddingReady) or set(missing) <= set(job.pending)):
            missing = await self._wait_for(refs, loaded, missing, job.pending)
        if not missing:
            return loaded  # type: ignore[return-value]
        # no more waiting; `again`: what the cache holds for these keys (if anything) is not usable, overwrite it
        encode_job = EncodeJob(request=job.request, keys=[r.key for r in refs], missing=missing, again=True)
        fallback = self.rt.settings.inline_encode and (getattr(job, "encode_inline", False) or job.pending)
        if self.inline_encode or fallback:  # (the pending encode elsewhere timed out, or no encoder is alive)
            refs = await self.encoder.encode(encode_job)
            return await self._embeddings(PrefillJob(request=job.request, images=refs))
        if isinstance(job, EmbeddingReady) and job.again:  # just encoded anew and already gone: do not loop
            raise RequestFailed(503, f"embeddings of images {missing} vanished from the encoder cache", "server_error")
        req: Request = job.request
        await self.rt.publish(subjects.ENCODE, encode_job, req.request_id, req.reply_to, "encode-again")
        return None

    async def _wait_for(
        self, refs: list[ImageEmbedding], loaded: list[Encoded | None], missing: list[int], pending: list[int]
    ) -> list[int]:
        """Load `missing` as encoders announce them (`ec_events.Landed`); returns what is still missing after the wait.

        Being encoded for another request (`pending`): up to `EPD_ENCODE_WAIT_S`, as long as that encode takes.
        Just saved by an encoder, a key can hide for a moment behind a concurrent rewrite: a short wait.
        """
        limit = self.rt.settings.encode_wait_s if set(missing) & set(pending) else 0.2
        keys = [refs[i].key for i in missing]
        landed = self.rt.landed.watch(keys)  # before looking: an embedding landing meanwhile still wakes us
        started = asyncio.get_running_loop().time()
        deadline = started + limit
        with tracer().start_as_current_span("ec.wait", attributes={"epd.images": len(missing)}) as span:
            try:
                while missing:
                    landed.clear()  # before looking: what lands after this look sets it again
                    await self._load_into(refs, loaded, missing)
                    missing = [i for i in missing if loaded[i] is None]
                    left = deadline - asyncio.get_running_loop().time()
                    if not missing or left <= 0:
                        break
                    try:
                        await asyncio.wait_for(landed.wait(), left)
                    except asyncio.TimeoutError:
                        await self._load_into(refs, loaded, missing)  # a last look: an event can be missed
                        missing = [i for i in missing if loaded[i] is None]
                        break
            finally:
                self.rt.landed.forget(keys, landed)
            span.set_attribute("epd.waited_ms", round((asyncio.get_running_loop().time() - started) * 1e3, 1))
            span.set_attribute("epd.hit", not missing)
        return missing

    async def _load_into(self, refs: list[ImageEmbedding], loaded: list[Encoded | None], indexes: list[int]) -> None:
        hits = await self.ec.load_many([refs[i].key for i in indexes])
        for i, hit in zip(indexes, hits, strict=True):
            loaded[i] = None if hit is None else Encoded(*hit)


class RemoteDecode:
    """e-p-d: the KV goes to the decoder with the most free KV (any, if none is known).

    Direct (`EPD_KV_TRANSFER=direct`): that decoder grants room before the forward, and each
    layer is written into it as it is computed. Otherwise, or when the direct path fails, the
    KV goes through the store, which any decoder can load.
    """

    def __init__(
        self, rt: Runtime, layout: KVLayout, store: KVConnector, picker: DecoderPicker, direct: KVSender | None
    ) -> None:
        self.rt, self.layout, self.store, self.picker, self.direct = rt, layout, store, picker, direct

    async def open(self, request_id: str, prompt_tokens: int, max_tokens: int) -> LayerWriter | None:
        if self.direct is None:
            return None
        target = await self.picker.choose(prompt_tokens + max_tokens)
        if target is None:
            return None
        lay = self.layout
        shape = (lay.layers, 2, lay.kv_heads, prompt_tokens, lay.head_dim)
        with tracer().start_as_current_span("kv.reserve", attributes={"epd.decoder": target}) as span:
            writer = await self.direct.open(target, request_id, shape, lay.dtype)
            span.set_attribute("epd.granted", writer is not None)
        return writer

    async def __call__(self, gen: Generation, out: Prefilled, writer: LayerWriter | None) -> None:
        handle, target = None, None
        if writer is not None:
            with tracer().start_as_current_span(
                "kv.send",
                attributes={
                    "epd.bytes": writer.nbytes,
                    "epd.layers": writer.shape[0],
                    "epd.path": "direct",
                    "epd.kv.peer": writer.grant.session,  # the decoder's host:port: KV goes there directly
                },
            ) as span:
                try:
                    handle, target = await writer.finish(), writer.decoder_id
                except TransferError as e:  # the store path below, to any decoder
                    span.set_status(Status(StatusCode.ERROR, str(e)))
                    log.warning("request %s: direct KV transfer failed (%s); through the store", gen.request_id, e)
        if handle is None:
            kv = out.kv
            nbytes = kv.numel() * kv.element_size()
            attributes = {"epd.bytes": nbytes, "epd.layers": kv.shape[0], "epd.path": "store"}
            with tracer().start_as_current_span("kv.send", attributes=attributes):
                handle = await self.store.send(gen.request_id, kv)
            target = await self.picker.choose(gen.prompt_tokens + gen.sampling.max_tokens)
        metrics.CONNECTOR_BYTES.labels("kv", "save").inc(handle.nbytes)
        ready = KVReady(
            request_id=gen.request_id,
            reply_to=gen.reply_to,
            model=self.rt.settings.model_name,
            sampling=gen.sampling,
            prompt_tokens=gen.prompt_tokens,
            first_token=gen.tokens[0],
            rope_delta=out.rope_delta,
            kv=handle,
            resume_tokens=gen.resumed,
        )
        subject = subjects.DECODE if target is None else subjects.decode_for(target)
        await self.rt.publish(subject, ready, gen.request_id, gen.reply_to, "decode")


class LocalDecode:
    """pd / epd: decode in this process, the KV stays where it is."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    async def open(self, request_id: str, prompt_tokens: int, max_tokens: int) -> None:
        return None

    async def __call__(self, gen: Generation, out: Prefilled, writer: LayerWriter | None) -> None:
        await self.decoder.generate(gen, out.kv, out.rope_delta)
