"""Decode: generate tokens from a prefilled KV cache and stream them to the client.

`generate_tokens` is the core shared by the decode stage (KV arrives from a prefill
worker) and the pd / epd roles (KV never leaves the process).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from epd.connectors.kv import KVConnector
from epd.ops import metrics
from epd.ops.tracing import tracer
from epd.schemas import subjects
from epd.schemas.common import FinishReason, SamplingParams, Usage
from epd.schemas.decode import KVReady
from epd.schemas.reply import TokenChunk
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.detokenizer import Detokenizer
from epd.workers.engine.family import DecodeState, Family
from epd.workers.engine.sampling import sample
from epd.workers.engine.stops import StopStrings
from epd.workers.runtime import Runtime


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


def finish_reason(
    token: int, gen_tokens: int, total_tokens: int, params: SamplingParams, eos: set[int], max_len: int
) -> FinishReason | None:
    if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
        return FinishReason.STOP
    if gen_tokens >= params.max_tokens or total_tokens >= max_len:
        return FinishReason.LENGTH
    return None


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


class Decoder:
    """Runs generations on one family; replies go through the runtime."""

    def __init__(self, rt: Runtime, ckpt: Checkpoint, family: Family) -> None:
        self.rt, self.family = rt, family
        self.eos = ckpt.eos_token_ids()
        self.max_len = ckpt.max_model_len()
        rt.load.kv_capacity = rt.settings.kv_cache_tokens

    async def generate(self, gen: Generation, state: DecodeState) -> None:
        load = self.rt.load
        held = gen.prompt_tokens + len(gen.tokens)  # tokens whose KV this generation holds
        load.kv_tokens += held
        metrics.ACTIVE_SEQUENCES.labels("decode").inc()
        metrics.KV_TOKENS.labels("decode").set(load.kv_tokens)
        started, steps = time.perf_counter(), 0
        with tracer().start_as_current_span(
            "decode", attributes={"epd.request_id": gen.request_id, "gen_ai.usage.input_tokens": gen.prompt_tokens}
        ) as span:
            try:
                while True:
                    if gen.request_id in self.rt.cancelled:
                        await self.rt.reply(gen.reply_to, chunk(gen, gen.seq, None, FinishReason.ABORT))
                        span.set_attribute("gen_ai.response.finish_reasons", ("abort",))
                        break
                    metrics.BATCH_SIZE.labels("decode").observe(1)
                    logits = await asyncio.to_thread(self.family.decode, state, gen.tokens[-1])
                    token = sample(logits, gen.sampling, state.position)
                    gen.tokens.append(token)
                    steps += 1
                    load.kv_tokens += 1
                    reason = finish_reason(
                        token,
                        len(gen.tokens),
                        gen.prompt_tokens + len(gen.tokens),
                        gen.sampling,
                        self.eos,
                        self.max_len,
                    )
                    reply = chunk(gen, gen.seq, token, reason)
                    await self.rt.reply(gen.reply_to, reply)
                    gen.seq += 1
                    if reply.finish_reason:
                        span.set_attribute("gen_ai.response.finish_reasons", (reply.finish_reason.name.lower(),))
                        break
            finally:
                load.kv_tokens -= held + steps
                metrics.ACTIVE_SEQUENCES.labels("decode").dec()
                metrics.KV_TOKENS.labels("decode").set(load.kv_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", len(gen.tokens))
            if steps:
                span.set_attribute("epd.tpot_ms", round((time.perf_counter() - started) * 1e3 / steps, 3))


class DecodeStage:
    name = "decode"
    subject = subjects.DECODE
    message_type = KVReady

    def __init__(self, rt: Runtime, ckpt: Checkpoint, family: Family, kv: KVConnector, capacity: int = 1) -> None:
        self.rt, self.ckpt, self.family, self.kv, self.capacity = rt, ckpt, family, kv, capacity
        self.decoder = Decoder(rt, ckpt, family)

    async def handle(self, job: KVReady) -> None:
        with tracer().start_as_current_span("kv.recv", attributes={"epd.bytes": job.kv.nbytes}):
            kv = await self.kv.recv(job.kv)
        metrics.CONNECTOR_BYTES.labels("kv", "load").inc(job.kv.nbytes)
        await self.kv.release(job.kv)
        state = self.family.start_decode(kv, job.rope_delta)
        gen = Generation(
            request_id=job.request_id,
            reply_to=job.reply_to,
            sampling=job.sampling,
            prompt_tokens=job.prompt_tokens,
            tokens=[job.first_token],
            detok=Detokenizer(self.ckpt.tokenizer),
            output=StopStrings(job.sampling.stop),
        )
        # the same text state the prefill worker had after the first token (its chunk is already sent)
        shown = [] if job.first_token in job.sampling.stop_token_ids else [job.first_token]
        gen.output.add(gen.detok.push(shown), final=False)
        await self.decoder.generate(gen, state)
