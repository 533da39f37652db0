"""Prefill stage: embeddings in, prompt through the language model, first token out, KV handed to decode."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Protocol

import torch
from epd.connectors.ec import ECConnector
from epd.connectors.kv import KVConnector, KVTransferError, KVWriter
from epd.core import metrics, subjects
from epd.core.routing import RoutingPolicy
from epd.core.tracing import tracer
from epd.schemas.decode import KVPath, KVReady
from epd.schemas.encode import EmbeddingReady
from epd.schemas.prefill import PrefillJob
from epd.schemas.request import Request
from epd.workers.decode import Decoder, Generation, chunk, prime_text
from epd.workers.decode_batch import finish_reason
from epd.workers.decoder_choice import DecoderPicker
from epd.workers.embedding_lookup import EmbeddingLookup
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
from epd.workers.services import Services
from opentelemetry.trace import Status, StatusCode

log = logging.getLogger(__name__)

PREFILL_BATCH_TOKENS = 16384


class Handoff(Protocol):
    """Where decoding continues after prefill."""

    async def open(self, request_id: str, prompt_tokens: int, max_tokens: int) -> KVWriter | None:
        """Before the forward: a writer that ships each layer's KV as it is computed, or None."""

    async def __call__(self, gen: Generation, out: Prefilled, writer: KVWriter | None) -> None:
        """After the first token: hand the request over (`writer` is what `open` gave)."""


class PrefillStage:
    name = durable = "prefill"
    subject = label = subjects.PREFILL
    inactive_s = None
    message_type = PrefillJob | EmbeddingReady

    def __init__(
        self,
        sv: Services,
        ckpt: Checkpoint,
        family: Family,
        ec: ECConnector,
        handoff: Handoff,
        shared_cache: bool = True,
    ) -> None:
        """`shared_cache` False: `ec` is this process's own (the epd role), and it encodes what that lacks."""
        self.out, self.cancelled, self.ckpt, self.family, self.handoff = sv.out, sv.cancelled, ckpt, family, handoff
        self.capacity = sv.settings.max_batch  # a slot per request that may share a forward
        self.eos = ckpt.eos_token_ids()
        self.max_len = ckpt.max_model_len()
        s = sv.settings
        policy = RoutingPolicy(shared_cache, inline_fallback=s.inline_encode, encode_wait_s=s.encode_wait_s)
        encoder = ImageEncoder(FamilyEncoder(family, ec, s.max_batch), ec, sv.images, sv.landed)  # inline encoding
        self.embeddings = EmbeddingLookup(ec, policy, sv.landed, encoder, sv.out, sv.load)
        # padded tokens in one forward at most: a long prompt is not batched with short ones
        self.batcher = MicroBatcher(
            self._forward,
            s.max_batch,
            "prefill",
            cost=lambda prompts: len(prompts) * max(len(ids) for ids, _, _ in prompts),
            max_cost=PREFILL_BATCH_TOKENS,
        )

    def _forward(self, prompts: list[tuple[list[int], list[Encoded], KVWriter | None]]) -> list[Prefilled]:
        """The batch's forward, its first tokens' logits brought to the host here, in the batcher's thread: read on
        the device from the event loop, each first token's sampling waited there for whatever the other threads
        had queued on the GPU by then (the next forward, the encoder's, decode steps), and the loop with it."""
        out = self.family.prefill_batch([(ids, images) for ids, images, _ in prompts], [w for *_, w in prompts])
        host = torch.stack([p.logits for p in out]).cpu()  # (batch, vocab): one copy, one wait
        return [replace(p, logits=row) for p, row in zip(out, host, strict=True)]

    async def handle(self, job: PrefillJob | EmbeddingReady) -> None:
        req = job.request
        if req.request_id in self.cancelled:
            return
        # 1. every image's embedding: from the cache, waited for, or encoded inline (None: back to the encoders)
        images = await self.embeddings.get(job)
        if images is None:
            return
        # 2. the prompt's token ids, image placeholders expanded
        ids = self._prompt(req, images)
        # 3. the forward and the first token; 4. the rest goes to decoding, with the KV
        writer = await self.handoff.open(req.request_id, len(ids), req.sampling.max_tokens)
        handed_over = False
        try:
            handed_over = await self._prefill(req, ids, images, writer)
        finally:
            if writer is not None and not handed_over:  # (the decoder frees the room it granted)
                await writer.abort()

    def _prompt(self, req: Request, images: list[Encoded]) -> list[int]:
        """The token ids to prefill (a continuation's earlier output included); a 400 if unusable."""
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
        except PromptError as e:
            raise RequestFailed(400, str(e)) from None
        ids = ids + list(req.resume_tokens)  # a continuation goes on from what it generated
        if len(ids) >= self.max_len:
            raise RequestFailed(400, f"prompt is {len(ids)} tokens; the model's maximum length is {self.max_len}")
        return ids

    async def _prefill(self, req: Request, ids: list[int], images: list[Encoded], writer: KVWriter | None) -> bool:
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
            # text-only prompts go ahead of queued pictures' (issue 21: behind them, text waited seconds on a GPU)
            out, batch = await self.batcher.submit((ids, images, writer), urgent=not images)
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
        with tracer().start_as_current_span("reply.first"):  # the first token leaves: where TTFT's last hop begins
            await self.out.reply(req.reply_to, reply)
        if reply.finish_reason is not None:
            return False
        await self.handoff(gen, out, writer)
        return True


class RemoteDecode:
    """e-p-d: the KV goes to the decoder with the most free KV (any, if none is known).

    Direct (`EPD_KV_TRANSFER=direct`): that decoder grants room before the forward, and each
    layer is written into it as it is computed. Otherwise, or when the direct path fails, the
    KV goes through the store, which any decoder can load.
    """

    def __init__(
        self, sv: Services, layout: KVLayout, store: KVConnector, picker: DecoderPicker, direct: KVConnector | None
    ) -> None:
        self.out, self.model_name = sv.out, sv.settings.model_name
        self.layout, self.store, self.picker, self.direct = layout, store, picker, direct

    async def open(self, request_id: str, prompt_tokens: int, max_tokens: int) -> KVWriter | None:
        lay = self.layout
        shape = (lay.layers, 2, lay.kv_heads, prompt_tokens, lay.head_dim)
        target = await self.picker.choose(prompt_tokens + max_tokens) if self.direct is not None else None
        if target is not None:
            with tracer().start_as_current_span("kv.reserve", attributes={"epd.decoder": target}) as span:
                writer = await self.direct.open(request_id, shape, lay.dtype, target)
                span.set_attribute("epd.granted", writer is not None)
            if writer is not None:
                return writer
        return await self.store.open(request_id, shape, lay.dtype)

    async def __call__(self, gen: Generation, out: Prefilled, writer: KVWriter | None) -> None:
        handle = None
        if writer is not None:
            attributes = {
                "epd.bytes": writer.nbytes,
                "epd.layers": writer.shape[0],
                "epd.path": writer.path.name.lower(),
            }
            if writer.peer:
                attributes["epd.kv.peer"] = writer.peer  # the decoder's host:port: KV goes there directly
            with tracer().start_as_current_span("kv.send", attributes=attributes) as span:
                try:
                    handle = await writer.finish()
                except KVTransferError as e:  # the store path below, to any decoder
                    span.set_status(Status(StatusCode.ERROR, str(e)))
                    log.warning("request %s: KV transfer failed (%s); through the store", gen.request_id, e)
        if handle is None:
            kv = out.kv
            nbytes = kv.numel() * kv.element_size()
            attributes = {"epd.bytes": nbytes, "epd.layers": kv.shape[0], "epd.path": "store"}
            with tracer().start_as_current_span("kv.send", attributes=attributes):
                handle = await self.store.send(gen.request_id, kv)
        if handle.path is KVPath.DIRECT:
            target = writer.decoder_id  # the decoder that holds it
        else:
            target = await self.picker.choose(gen.prompt_tokens + gen.sampling.max_tokens)
        metrics.CONNECTOR_BYTES.labels("kv", "save").inc(handle.nbytes)
        ready = KVReady(
            request_id=gen.request_id,
            reply_to=gen.reply_to,
            model=self.model_name,
            sampling=gen.sampling,
            prompt_tokens=gen.prompt_tokens,
            first_token=gen.tokens[0],
            rope_delta=out.rope_delta,
            kv=handle,
            resume_tokens=gen.resumed,
        )
        subject = subjects.DECODE if target is None else subjects.decode_for(target)
        await self.out.publish(subject, ready, gen.request_id, gen.reply_to, "decode")


class LocalDecode:
    """pd / epd: decode in this process, the KV stays where it is."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    async def open(self, request_id: str, prompt_tokens: int, max_tokens: int) -> None:
        return None

    async def __call__(self, gen: Generation, out: Prefilled, writer: KVWriter | None) -> None:
        await self.decoder.generate(gen, out.kv, out.rope_delta)
