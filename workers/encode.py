"""Encode stage: compute the embeddings a request's images lack, save them, hand over to prefill."""

from __future__ import annotations

from epd.connectors.ec import ECConnector
from epd.ops import metrics
from epd.ops.tracing import tracer
from epd.schemas import subjects
from epd.schemas.common import ImageEmbedding
from epd.schemas.encode import EmbeddingReady, EncodeJob
from epd.workers.engine.family import Encoded, Family, ImageRejected
from epd.workers.images import BadImage, open_image
from epd.workers.loop import RequestFailed
from epd.workers.micro_batch import MicroBatcher
from epd.workers.runtime import Runtime
from PIL import Image

ImageBatcher = MicroBatcher[list[Image.Image], list[Encoded]]


def image_batcher(family: Family, max_batch: int) -> ImageBatcher:
    """Several requests' images through the vision tower in one forward (packed, any sizes)."""

    def run(requests: list[list[Image.Image]]) -> list[list[Encoded]]:
        encoded = family.encode([image for images in requests for image in images])
        parts, at = [], 0
        for images in requests:
            parts.append(encoded[at : at + len(images)])
            at += len(images)
        return parts

    return MicroBatcher(run, max_batch, "encode")


async def encode_images(encoder: ImageBatcher, ec: ECConnector, job: EncodeJob) -> list[ImageEmbedding]:
    """Encode `job.missing` (batched with other requests' images), save each; refs for every image of the request."""
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
    ) as span:
        try:
            encoded, batch = await encoder.submit(pictures)
            span.set_attribute("epd.batch", batch)
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

    def __init__(self, rt: Runtime, family: Family, ec: ECConnector) -> None:
        self.rt, self.family, self.ec = rt, family, ec
        self.capacity = rt.settings.max_batch  # a slot per request that may share a forward
        self.encoder = image_batcher(family, rt.settings.max_batch)

    async def handle(self, job: EncodeJob) -> None:
        refs = await encode_images(self.encoder, self.ec, job)
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
