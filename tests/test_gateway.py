"""The gateway as clients meet it: the README's NATS example, cancellation, API keys."""

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest
from epd.gateway.app import create_app
from epd.ops.config import Settings
from epd.ops.status_view import gather_status
from epd.ops.trace_view import load_spans, spans_for_request
from epd.ops.up import Cluster

from .conftest import chat_body
from .oracle import reference

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.e2e
async def test_the_readme_nats_example_runs(cluster: Cluster, tiny_model: Path) -> None:
    section = README.read_text().split("## NATS-native API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the example exactly as a reader copies it
    text = await namespace["ask"](cluster.settings.nats_url)
    _, expected = reference(tiny_model, "Hello!", None, 16)
    assert text == expected


@pytest.mark.e2e
async def test_a_client_that_goes_away_frees_the_decoder(cluster: Cluster) -> None:
    body = {**chat_body("Tell me a long story."), "max_tokens": 3500, "stream": True}
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            first = await anext(lines)  # the role delta
            request_id = re.search(r'"id": "([^"]+)"', first).group(1)
            async for line in lines:
                if '"content": "' in line and '"content": ""' not in line:
                    break  # tokens are flowing; now hang up
    hung_up, hung_up_wall = time.monotonic(), time.time()
    # 3500 tokens take several seconds here; the decoder must let go long before that
    while True:
        workers, _ = await gather_status(cluster.settings.nats_url)
        busy = [w for w in workers if w.kv_tokens or w.active]
        if not busy and all(w.updated_at > hung_up_wall for w in workers):  # fresh heartbeats, all idle
            break
        assert time.monotonic() - hung_up < 5, busy
        await asyncio.sleep(0.2)
    for _ in range(50):
        decode = [
            s
            for s in spans_for_request(load_spans(Path(cluster.settings.trace_dir)), request_id)
            if s["name"] == "decode"
        ]
        if decode:
            break
        await asyncio.sleep(0.2)
    attrs = decode[0]["attributes"]
    assert attrs["gen_ai.response.finish_reasons"] == ["abort"]
    assert attrs["gen_ai.usage.output_tokens"] < 3500


@pytest.mark.integration
async def test_api_keys(infra_settings: Settings) -> None:
    app = create_app(infra_settings.replace(api_keys="key-one, key-two", topology="e-p-d"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            missing = await client.get("/v1/models")
            wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
            for r in (missing, wrong):
                assert r.status_code == 401
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.json()["error"]["code"] == "invalid_api_key"
            ok = await client.get("/v1/models", headers={"Authorization": "Bearer key-two"})
            assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny-qwen2-vl"
            assert (await client.get("/health")).status_code == 200  # probes need no key
