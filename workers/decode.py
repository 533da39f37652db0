"""Decode: generate tokens from a prefilled KV cache and stream them to the client.

`Decoder.generate` is the core shared by the decode stage (KV arrives from a prefill
worker) and the pd / epd roles (KV never leaves the process); every generation of a
process runs in its one continuous batch (`decode_batch.py`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from epd.connectors.kv import KVConnector, KVTransferError
from epd.connectors.tensors import TensorIntegrityError
from epd.core import metrics, subjects
from epd.core.tracing import tracer
from epd.schemas.common import FinishReason, SamplingParams, Usage
from epd.schemas.decode import KVPath, KVReady
from epd.schemas.reply import TokenChunk
from epd.workers.decode_batch import DecodeBatch
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.detokenizer import Detokenizer
from epd.workers.engine.family import Family
from epd.workers.engine.kv_cache import PagedKVCache
from epd.workers.engine.stops import StopStrings
from epd.workers.errors import RequestFailed
from epd.workers.services import Services


@dataclass
class Generation:
    """One request's progress: the first token comes from prefill."""

    request_id: str
    reply_to: str
    sampling: SamplingParams
    prompt_tokens: int
    tokens: list[int]
    detok: Detokenizer
    output: StopStrings
    seq: int = 1  # chunk 0 was the first token
    resumed: list[int] = field(default_factory=list)  # a continuation's earlier tokens (Request.resume_tokens)


def chunk(gen: Generation, seq: int, token: int | None, reason: FinishReason | None) -> TokenChunk:
    """The reply for one new token (None: no new token, as on abort); a stop string may end it here.

    The last chunk flushes any partial character or held-back text, and carries usage.
    """
    tokens = [] if token is None else [token]
    shown = [t for t in tokens if t not in gen.sampling.stop_token_ids]
    piece = gen.detok.push(shown, final=reason is not None)
    text, stopped = gen.output.add(piece, final=reason is not None)
    if stopped:
        reason = FinishReason.STOP
    usage = Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=len(gen.tokens)) if reason else None
    return TokenChunk(
        request_id=gen.request_id, seq=seq, token_ids=tokens, text=text, finish_reason=reason, usage=usage
    )


def prime_text(gen: Generation, tokens: list[int]) -> None:
    """Bring the detokenizer and stop strings to where they were after `tokens` (already sent), sending nothing."""
    shown = [t for t in tokens if t not in gen.sampling.stop_token_ids]
    if shown:
        gen.output.add(gen.detok.skip(shown), final=False)


class Decoder:
    """Runs generations on one family in one continuous batch; replies go through the outbox."""

    def __init__(self, sv: Services, ckpt: Checkpoint, family: Family) -> None:
        self.out, self.family = sv.out, family
        cache = PagedKVCache(family.kv_layout(), int(sv.settings.kv_cache_mb * 2**20))
        self.batch = DecodeBatch(
            family, cache, sv.settings.max_seqs, ckpt.eos_token_ids(), ckpt.max_model_len(), sv.cancelled, sv.load
        )

    async def generate(self, gen: Generation, kv: torch.Tensor, rope_delta: int) -> None:
        """Decode after prefill's first token (in `gen`) from the prompt's KV, until a finish."""
        started = time.perf_counter()
        with tracer().start_as_current_span(
            "decode", attributes={"epd.request_id": gen.request_id, "gen_ai.usage.input_tokens": gen.prompt_tokens}
        ) as span:
            seq = await self.batch.admit(gen.request_id, kv, rope_delta, gen.tokens[-1], gen.sampling)
            span.set_attribute("epd.admit_ms", round((time.perf_counter() - started) * 1e3, 3))
            started, steps = time.perf_counter(), 0
            try:
                while True:
                    item = (None, FinishReason.ABORT) if seq is None else await seq.out.get()
                    if isinstance(item, BaseException):
                        raise item
                    token, reason = item
                    if token is not None:
                        gen.tokens.append(token)
                        steps += 1
                    reply = chunk(gen, gen.seq, token, reason)
                    await self.out.reply(gen.reply_to, reply)
                    gen.seq += 1
                    if reply.finish_reason:
                        span.set_attribute("gen_ai.response.finish_reasons", (reply.finish_reason.name.lower(),))
                        break
            finally:
                if seq is not None:
                    self.batch.leave(seq)
            span.set_attribute("gen_ai.usage.output_tokens", len(gen.tokens))
            if steps:
                span.set_attribute("epd.tpot_ms", round((time.perf_counter() - started) * 1e3 / steps, 3))


class DecodeStage:
    name = durable = "decode"
    subject = label = subjects.DECODE
    inactive_s = None
    message_type = KVReady

    def __init__(self, sv: Services, ckpt: Checkpoint, family: Family, kv: Mapping[KVPath, KVConnector]) -> None:
        """`kv`: the connector that loads each path's handles (the store's, and the direct one's if enabled)."""
        self.ckpt, self.family, self.kv = ckpt, family, kv
        self.capacity = sv.settings.max_seqs  # admission (free slots and KV) decides who runs
        self.decoder = Decoder(sv, ckpt, family)

    async def handle(self, job: KVReady) -> None:
        connector = self.kv.get(job.kv.path)
        with tracer().start_as_current_span("kv.recv", attributes={"epd.bytes": job.kv.nbytes}):
            try:
                if connector is None:  # (a direct handle moved to a decoder that takes none: its grant is elsewhere)
                    raise KVTransferError(f"this decoder loads no {job.kv.path.name} KV")
                kv = await connector.recv(job.kv)
            except KVTransferError as e:  # (its first decoder died holding it): the client goes on from its tokens
                raise RequestFailed(503, f"the request's KV cache is lost: {e}", "server_error", True) from None
            except TensorIntegrityError as e:
                raise RequestFailed(500, f"the request's KV cache is corrupt: {e}", "server_error") from None
            finally:
                if connector is not None:
                    await connector.release(job.kv)
        metrics.CONNECTOR_BYTES.labels("kv", "load").inc(job.kv.nbytes)
        gen = Generation(
            request_id=job.request_id,
            reply_to=job.reply_to,
            sampling=job.sampling,
            prompt_tokens=job.prompt_tokens,
            tokens=[job.first_token],
            detok=Detokenizer(self.ckpt.tokenizer),
            output=StopStrings(job.sampling.stop),
            resumed=job.resume_tokens,
        )
        # the same text state the prefill worker had after the first token (its chunk is already sent)
        prime_text(gen, [*job.resume_tokens, job.first_token])
        await self.decoder.generate(gen, kv, job.rope_delta)
