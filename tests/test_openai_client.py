"""The official `openai` Python client against the gateway: every feature a client uses, answers checked
against transformers' `generate`."""

from pathlib import Path

import openai
import pytest
from epd.ops.up import Cluster

from .conftest import MAX_NEW, data_url, png_bytes
from .oracle import reference, reference_text

pytestmark = pytest.mark.e2e


def client(cluster: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cluster.base_url + "/v1", api_key="not-needed", max_retries=0)


def image_message(question: str, image: bytes) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


async def test_chat_with_an_image_streamed_and_not(cluster: Cluster, tiny_model: Path) -> None:
    image = png_bytes(size=(100, 64), color=(40, 200, 40), shape="circle")
    _, expected = reference(tiny_model, "What color is the shape?", image, MAX_NEW)
    async with client(cluster) as c:
        models = [m.id async for m in c.models.list()]
        assert models == ["tiny-qwen2-vl"]
        messages = image_message("What color is the shape?", image)
        out = await c.chat.completions.create(
            model="tiny-qwen2-vl", messages=messages, max_completion_tokens=MAX_NEW, temperature=0
        )
        assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
        assert out.usage.completion_tokens >= 1 and out.choices[0].finish_reason in ("stop", "length")
        stream = await c.chat.completions.create(
            model="tiny-qwen2-vl",
            messages=messages,
            max_tokens=MAX_NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage, reasons = [], None, []
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                reasons.append(chunk.choices[0].finish_reason)
            if chunk.usage:
                usage = chunk.usage
        assert "".join(parts) == expected
        assert reasons[-1] == out.choices[0].finish_reason and usage == out.usage


async def test_text_completions(cluster: Cluster, tiny_model: Path) -> None:
    _, expected = reference_text(tiny_model, "Once upon a time", MAX_NEW)
    async with client(cluster) as c:
        out = await c.completions.create(
            model="tiny-qwen2-vl", prompt="Once upon a time", max_tokens=MAX_NEW, temperature=0
        )
        assert out.object == "text_completion" and out.choices[0].text == expected
        stream = await c.completions.create(
            model="tiny-qwen2-vl", prompt="Once upon a time", max_tokens=MAX_NEW, temperature=0, stream=True
        )
        assert "".join([chunk.choices[0].text async for chunk in stream]) == expected
        with pytest.raises(openai.BadRequestError, match="exactly one"):
            await c.completions.create(model="tiny-qwen2-vl", prompt=["a", "b"], max_tokens=2)


async def test_errors_arrive_as_the_clients_exceptions(cluster: Cluster) -> None:
    async with client(cluster) as c:
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="could not be decoded"):
            await c.chat.completions.create(
                model="tiny-qwen2-vl", messages=image_message("What?", b"\x89PNG\r\n\x1a\n truncated")
            )
        with pytest.raises(openai.BadRequestError, match="n=2"):
            await c.chat.completions.create(model="tiny-qwen2-vl", messages=[{"role": "user", "content": "hi"}], n=2)
        # and the server is still serving
        ok = await c.chat.completions.create(
            model="tiny-qwen2-vl", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert ok.choices[0].message.content is not None


async def test_stop_strings_and_stop_token_ids(cluster: Cluster, tiny_model: Path) -> None:
    from .oracle import decode

    ids, text = reference(tiny_model, "Describe the weather.", None, MAX_NEW)
    assert len(text) >= 6 and len(ids) >= 4  # enough output to stop inside
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.index(stop)]
    messages = [{"role": "user", "content": "Describe the weather."}]
    async with client(cluster) as c:
        out = await c.chat.completions.create(
            model="tiny-qwen2-vl", messages=messages, max_tokens=MAX_NEW, temperature=0, stop=[stop, "never-seen"]
        )
        assert out.choices[0].message.content == expected and out.choices[0].finish_reason == "stop"
        stream = await c.chat.completions.create(
            model="tiny-qwen2-vl", messages=messages, max_tokens=MAX_NEW, temperature=0, stop=stop, stream=True
        )
        assert "".join([ch.choices[0].delta.content or "" async for ch in stream]) == expected
        cut = ids.index(ids[2])  # a stop token id ends the output before it, at its first occurrence
        out = await c.chat.completions.create(
            model="tiny-qwen2-vl",
            messages=messages,
            max_tokens=MAX_NEW,
            temperature=0,
            extra_body={"stop_token_ids": [ids[2]]},
        )
        assert out.choices[0].message.content == decode(tiny_model, ids[:cut])
        assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == cut + 1
        with pytest.raises(openai.BadRequestError, match="at most 4"):
            await c.chat.completions.create(model="tiny-qwen2-vl", messages=messages, stop=["a", "b", "c", "d", "e"])


async def test_seeded_sampling_repeats_and_top_p_one_token_is_greedy(cluster: Cluster, tiny_model: Path) -> None:
    messages = [{"role": "user", "content": "Pick some words."}]
    _, greedy = reference(tiny_model, "Pick some words.", None, MAX_NEW)
    async with client(cluster) as c:

        async def ask(**kw: object) -> str:
            out = await c.chat.completions.create(model="tiny-qwen2-vl", messages=messages, max_tokens=MAX_NEW, **kw)
            return out.choices[0].message.content

        first, again = await ask(temperature=1.5, seed=7), await ask(temperature=1.5, seed=7)
        assert first == again  # the same seed draws the same tokens, wherever prefill and decode run
        others = {await ask(temperature=1.5, seed=s) for s in range(8, 12)}
        assert len(others | {first}) > 1  # and the seed matters
        assert await ask(temperature=1.0, top_p=1e-9, seed=3) == greedy  # only the top token survives top_p
