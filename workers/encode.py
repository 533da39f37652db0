"""Encode stage: compute the embeddings a request's images lack, save them, hand over to prefill."""

from __future__ import annotations

import asyncio

from epd.connectors.ec import ECConnector
from epd.ops import metrics
from epd.ops.tracing import tracer
from epd.schemas import subjects
from epd.schemas.common import ImageEmbedding
from epd.schemas.encode import EmbeddingReady, EncodeJob
from epd.workers.engine.family import Family, ImageRejected
from epd.workers.images import BadImage, open_image
from epd.workers.loop import RequestFailed
from epd.workers.runtime import Runtime


async def encode_images(family: Family, ec: ECConnector, job: EncodeJob) -> list[ImageEmbedding]:
    """Encode `job.missing` in one forward, save each; returns refs for every image of the request."""
    images = job.request.images()
    refs = [ImageEmbedding(key=k) for k in job.keys]
    # Another request may have brought the same image in meanwhile: encode (and rewrite) only what is still absent.
    present = await ec.exists([job.keys[i] for i in job.missing])
    missing = [i for i, there in zip(job.missing, present, strict=True) if not there]
    try:
        pictures = [open_image(images[i].data, i) for i in missing]
    except BadImage as e:
        raise RequestFailed(400, str(e)) from None
    if not pictures:
        return refs
    with tracer().start_as_current_span(
        "encode", attributes={"epd.images": len(pictures), "epd.pixels": sum(p.width * p.height for p in pictures)}
    ):
        metrics.BATCH_SIZE.labels("encode").observe(len(pictures))
        try:
            encoded = await asyncio.to_thread(family.encode, pictures)
        except ImageRejected as e:
            raise RequestFailed(400, f"the images could not be processed: {e}") from None
    for i, enc in zip(missing, encoded, strict=True):
        with tracer().start_as_current_span(
            "ec.save", attributes={"epd.image": i, "epd.hit": False, "epd.key": job.keys[i]}
        ) as span:
            refs[i] = await ec.save(job.keys[i], enc.embedding, enc.grid_thw)
            nbytes = refs[i].tensor.nbytes if refs[i].tensor else 0
            span.set_attribute("epd.bytes", nbytes)
            metrics.CONNECTOR_BYTES.labels("ec", "save").inc(nbytes)
    return refs


class EncodeStage:
    name = "encode"
    subject = subjects.ENCODE
    message_type = EncodeJob

    def __init__(self, rt: Runtime, family: Family, ec: ECConnector, capacity: int = 1) -> None:
        self.rt, self.family, self.ec, self.capacity = rt, family, ec, capacity

    async def handle(self, job: EncodeJob) -> None:
        refs = await encode_images(self.family, self.ec, job)
        if not job.handoff:  # the request's lead part hands over; prefill waits for this part in the cache
            return
        req = job.request
        await self.rt.publish(
            subjects.PREFILL,
            EmbeddingReady(request=req, images=refs, pending=job.pending),
            req.request_id,
            req.reply_to,
            "prefill",
        )
