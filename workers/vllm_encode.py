"""vLLM as the engine of an encode worker (`epd worker encode --engine vllm`): vLLM's vision encoder computes the
embeddings, and `EpdECConnector` (connectors/ec_vllm.py), as producer, saves them in epd's cache under epd's
content keys and in epd's format. The rest is epd's encode stage (workers/encode.py), unchanged: the JetStream
loop, the in-process de-duplication of keys, the claims released, `EmbeddingReady` to prefill and the
`Landed` events.

vLLM 0.32 runs a producer-only instance (`ec_producer`) as an encoder alone (`mm_encoder_only`): it loads the
vision tower's weights only, keeps no KV cache and finishes a request once its prompt is encoded, without a
language-model forward. Each image goes in as a request of its own: a prompt with only that image in it (the
checkpoint's chat template places it), its key as vLLM's identifier (`multi_modal_uuids`), so the connector
saves under it. Concurrent requests share vLLM's encoder steps (its own batching, `EPD_MAX_BATCH` requests).

The save happens in vLLM's engine process, before the request finishes; this process then checks that every
key is in the cache, so an embedding vLLM did not save (an image it could not describe) is an error here and
never a silent miss downstream. The refs sent on carry the keys (prefill loads by key); the tensor handles stay
with the engine process that saved them.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from epd.connectors.ec import ECConnector
from epd.core.tracing import tracer
from epd.schemas.common import ImageEmbedding
from epd.workers.errors import RequestFailed
from PIL import Image


def encoder_prompt(tokenizer: Any) -> str:
    """A user turn with one image and nothing else, in the checkpoint's chat template: the placeholder as the
    model expects it (vision start, image pad, vision end for Qwen2-VL), which vLLM expands to the image's size."""
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


class VllmEncoder:
    """`Producer` (workers/encode.py) on a vLLM engine in the `ec_producer` role."""

    def __init__(self, llm: Any, prompt: str, ec: ECConnector) -> None:
        from vllm import SamplingParams

        self.llm, self.prompt, self.ec = llm, prompt, ec
        self._params = SamplingParams(max_tokens=1)  # an encoder-only instance finishes at the prompt's end anyway

    async def produce(self, keys: list[str], pictures: list[Image.Image]) -> list[ImageEmbedding]:
        attrs = {"epd.images": len(pictures), "epd.pixels": sum(p.width * p.height for p in pictures)}
        with tracer().start_as_current_span("encode", attributes={**attrs, "epd.engine": "vllm"}):
            await asyncio.gather(*(self._encode(key, picture) for key, picture in zip(keys, pictures, strict=True)))
        present = await self.ec.exists(keys)
        lost = [k for k, there in zip(keys, present, strict=True) if not there]
        if lost:
            raise RequestFailed(500, f"vLLM's encoder finished without saving the embeddings of {lost}", "server_error")
        return [ImageEmbedding(key=k) for k in keys]

    async def _encode(self, key: str, picture: Image.Image) -> None:
        prompt: dict[str, Any] = {"prompt": self.prompt, "multi_modal_data": {"image": [picture]}}
        prompt["multi_modal_uuids"] = {"image": [key]}  # vLLM's identifier: the key the connector saves under
        try:
            async for _ in self.llm.generate(prompt, self._params, f"encode-{uuid.uuid4().hex}"):
                pass
        except ValueError as e:  # vLLM's processor refused the image (its size, its mode)
            raise RequestFailed(400, f"the images could not be processed: {e}") from None
