"""Encode stage: compute the embeddings a request's images lack, save them, hand over to prefill."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import torch
from epd.connectors.ec import ECConnector
from epd.connectors.image_store import ImageMissing, ImageStore
from epd.core import metrics, subjects
from epd.core.ec_events import Landed
from epd.core.images import BadImage, open_image
from epd.core.tracing import tracer
from epd.schemas.common import ImageEmbedding, ImagePart
from epd.schemas.encode import EmbeddingReady, EncodeJob
from epd.workers.engine.family import Encoded, Family, ImageRejected
from epd.workers.errors import RequestFailed
from epd.workers.micro_batch import MicroBatcher
from epd.workers.services import Services
from PIL import Image

log = logging.getLogger(__name__)


class Producer(Protocol):
    """An engine's image encoding: embeddings computed and saved under their keys, before `produce` returns."""

    async def produce(self, keys: list[str], pictures: list[Image.Image]) -> list[ImageEmbedding]:
        """Encode `pictures` (one per key) and save each in the encoder cache; their refs, in order."""
        ...


@dataclass
class Prepared:
    """A batch's images preprocessed for the tower: pixel_values on the device, grids, images per request."""

    pixels: torch.Tensor
    grids: list[list[int]]
    counts: list[int]


class FamilyEncoder:
    """epd's engine: the family's vision tower, several requests' images in one forward (packed, any sizes).

    The stages overlap: each request's images are fetched from the image store and decoded in its own task
    (`ImageEncoder`, a thread for the decode); the batcher prepares the next batch (`_prepare`, a thread: the
    image processor, or torch operations on the device, on a stream of their own) while the current one runs on
    the device (`_run`); and a finished batch's embeddings are saved from device memory (the Mooncake connector
    copies each one once, device to its registered buffer) while the next batch runs.
    """

    def __init__(self, family: Family, ec: ECConnector, max_batch: int) -> None:
        self.ec = ec
        self.batcher = MicroBatcher(self._run, max_batch, "encode", prepare=self._prepare)
        self._family = family

    def _prepare(self, requests: list[list[Image.Image]]) -> Prepared:
        pixels, grids = self._family.prepare([image for images in requests for image in images])
        return Prepared(pixels, grids, [len(images) for images in requests])

    def _run(self, batch: Prepared) -> list[list[Encoded]]:
        encoded = self._family.encode_prepared(batch.pixels, batch.grids)
        if batch.pixels.is_cuda:
            # the embeddings are complete before anyone reads them: the connector copies them to the host on a
            # stream of its own, which must not wait behind the next batch's forward on this one
            torch.cuda.current_stream(batch.pixels.device).synchronize()
        parts, at = [], 0
        for n in batch.counts:
            parts.append(encoded[at : at + n])
            at += n
        return parts

    async def produce(self, keys: list[str], pictures: list[Image.Image]) -> list[ImageEmbedding]:
        with tracer().start_as_current_span(
            "encode", attributes={"epd.images": len(pictures), "epd.pixels": sum(p.width * p.height for p in pictures)}
        ) as span:
            try:
                encoded, batch = await self.batcher.submit(pictures)
                span.set_attribute("epd.batch", batch)
            except ImageRejected as e:
                raise RequestFailed(400, f"the images could not be processed: {e}") from None
        with tracer().start_as_current_span("ec.save", attributes={"epd.images": len(keys)}) as span:
            saved = await self.ec.save_many(
                [(key, enc.embedding, enc.grid_thw) for key, enc in zip(keys, encoded, strict=True)]
            )
            nbytes = sum(ref.tensor.nbytes for ref in saved if ref.tensor)
            span.set_attribute("epd.bytes", nbytes)
            metrics.CONNECTOR_BYTES.labels("ec", "save").inc(nbytes)
        return saved


class ImageEncoder:
    """A process's image encoding, on an engine (`Producer`), and each image key encoded once at a time: a
    request whose image this process is already encoding for another request waits for that encode instead of
    repeating it."""

    def __init__(self, producer: Producer, ec: ECConnector, images: ImageStore, landed: Landed) -> None:
        self.producer, self.ec, self.images, self.landed = producer, ec, images, landed
        self._inflight: dict[str, asyncio.Future] = {}  # key -> its ImageEmbedding, or None if that encode failed

    async def encode(self, job: EncodeJob) -> list[ImageEmbedding]:
        """Encode `job.missing` and save each; refs for every image of the request."""
        refs = [ImageEmbedding(key=k) for k in job.keys]
        # Another request may have brought the same image in meanwhile: encode (and rewrite) only what is still absent
        # (unless prefill found those entries unusable: then they exist, damaged, and must be written anew).
        present = [False] * len(job.missing)
        if not job.again:
            with tracer().start_as_current_span("ec.exists", attributes={"epd.images": len(job.missing)}):
                present = await self.ec.exists([job.keys[i] for i in job.missing])
        missing = [i for i, there in zip(job.missing, present, strict=True) if not there]
        first: dict[str, int] = {}  # key -> its first image in this request: one encode per key
        for i in missing:
            first.setdefault(job.keys[i], i)
        elsewhere = {i: self._inflight[k] for k, i in first.items() if k in self._inflight}
        mine = {i: asyncio.get_running_loop().create_future() for i in first.values() if i not in elsewhere}
        self._inflight.update({job.keys[i]: f for i, f in mine.items()})
        saved = False
        try:
            await self._encode_and_save(job, list(mine), refs)
            saved = True
        finally:
            for i, future in mine.items():
                future.set_result(refs[i] if saved else None)
                del self._inflight[job.keys[i]]
        again = []
        for i, future in elsewhere.items():
            ref = await asyncio.shield(future)
            if ref is None:  # that request's encode failed: this one tries itself
                again.append(i)
            else:
                refs[i] = ref
        if again:
            await self._encode_and_save(job, again, refs)
        for i in missing:  # the same image again in this request: its first one's embedding
            refs[i] = refs[first[job.keys[i]]]
        return refs

    async def _encode_and_save(self, job: EncodeJob, missing: list[int], refs: list[ImageEmbedding]) -> None:
        if not missing:
            return
        pictures = await self._fetch(job, missing)
        keys = [job.keys[i] for i in missing]
        saved = await self.producer.produce(keys, pictures)
        for i, ref in zip(missing, saved, strict=True):
            refs[i] = ref
        await self.landed.announce(keys)  # prefill workers waiting for them wake

    async def _fetch(self, job: EncodeJob, indexes: list[int]) -> list[Image.Image]:
        """The images to encode, from the image store (only these: not the request's others), decoded."""
        parts = job.request.images()
        try:
            with tracer().start_as_current_span("images.get", attributes={"epd.images": len(indexes)}):
                data = await asyncio.gather(*(self._bytes(parts[i]) for i in indexes))
        except ImageMissing as e:
            raise RequestFailed(503, f"{e}: send the request again", "server_error") from None
        try:
            with tracer().start_as_current_span("images.decode", attributes={"epd.images": len(indexes)}):
                return await asyncio.to_thread(lambda: [open_image(d, i) for d, i in zip(data, indexes, strict=True)])
        except BadImage as e:
            raise RequestFailed(400, str(e)) from None

    async def _bytes(self, part: ImagePart) -> bytes:
        return part.data or await self.images.get(part.key)


class EncodeStage:
    name = durable = "encode"
    subject = label = subjects.ENCODE
    inactive_s = None
    message_type = EncodeJob

    def __init__(self, sv: Services, producer: Producer, ec: ECConnector) -> None:
        """`producer`: the engine that encodes (`FamilyEncoder`, or vLLM's in workers/vllm_encode.py)."""
        self.out, self.claims = sv.out, sv.claims
        self.capacity = sv.settings.max_batch  # a slot per request that may share a forward
        self.encoder = ImageEncoder(producer, ec, sv.images, sv.landed)

    async def handle(self, job: EncodeJob) -> None:
        try:
            refs = await self.encoder.encode(job)
        finally:
            # saved (the cache answers for them now) or failed (the next request must not wait on a claim for an
            # encode that is not coming): either way the router's in-flight claims on these images are done
            await self.claims.release([job.keys[i] for i in job.missing])
        if not job.handoff:  # the request's lead part hands over; prefill waits for this part in the cache
            return
        req = job.request
        # sent back by prefill (`again`), the request's first prefill message already has "prefill" as its
        # de-duplication id: this one must not be dropped as its duplicate
        await self.out.publish(
            subjects.PREFILL,
            EmbeddingReady(request=req, images=refs, pending=job.pending, again=job.again),
            req.request_id,
            req.reply_to,
            "prefill-again" if job.again else "prefill",
        )
