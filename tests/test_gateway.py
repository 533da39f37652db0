"""The gateway as clients meet it: cancellation, API keys."""

import asyncio
import io
import json
import random
import re
import time
import zlib
from pathlib import Path

import httpx
import pytest
from epd.core.config import Settings
from epd.gateway.app import create_app
from epd.ops.status_view import gather_status
from epd.ops.trace_view import load_spans, spans_for_request
from epd.ops.up import Cluster
from PIL import Image

from .conftest import chat_body, png_bytes


@pytest.mark.e2e
async def test_a_client_that_goes_away_frees_the_decoder(cluster: Cluster) -> None:
    # 3500 tokens, EOS or not: several seconds of decoding, so that a cancel shows
    body = {**chat_body("Tell me a long story."), "max_tokens": 3500, "ignore_eos": True, "stream": True}
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
    # the decoder must let go at once, long before the 3500th token
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


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one compressed row of data (enough to open it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1)))


@pytest.mark.e2e
async def test_limits_answer_413_and_400_and_the_server_serves_on(cluster: Cluster) -> None:
    s = cluster.settings
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
        huge = await client.post(
            "/v1/chat/completions",
            content=b"x" * int(s.max_body_mb * (1 << 20) + 1),
            headers={"content-type": "application/json"},
        )
        assert huge.status_code == 413 and "over the limit" in huge.json()["error"]["message"]

        async def chunks():  # no Content-Length: the limit holds while the body streams in
            for _ in range(int(s.max_body_mb) + 48):  # well past what socket buffers absorb
                yield b"y" * (1 << 20)

        # bounded: a server that stops reading a refused body leaves this client blocked for good
        streamed = await asyncio.wait_for(
            client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}), 60
        )
        assert streamed.status_code == 413
        many = chat_body("Which?", png_bytes(size=(40, 40)))
        many["messages"][0]["content"] = many["messages"][0]["content"][:1] * (s.max_images + 1) + [
            {"type": "text", "text": "Which?"}
        ]
        r = await client.post("/v1/chat/completions", json=many)
        assert r.status_code == 413 and f"at most {s.max_images}" in r.json()["error"]["message"]
        side = int(s.max_image_pixels**0.5) + 1  # a decompression bomb: a small file that claims many pixels
        r = await client.post("/v1/chat/completions", json=chat_body("Big?", bomb_png(side, side)))
        assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
        thin = await client.post("/v1/chat/completions", json=chat_body("Thin?", png_bytes(size=(2000, 4))))
        assert thin.status_code == 400 and "aspect ratio" in thin.json()["error"]["message"]  # the processor's rule
        r = await client.post("/v1/chat/completions", json={**chat_body("Long?"), "max_tokens": s.max_tokens_limit + 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        # an integer past what the wire carries (64 bits) is refused at the door, not by the encoder's crash
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "top_k": 10**30})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text
        # JSON can escape a lone surrogate, which is no character: the field that holds one is named
        for route, body, field in (
            ("/v1/completions", {"model": "m", "prompt": "a\ud800b"}, "prompt"),
            ("/v1/completions", {"model": "m", "prompt": ["x"], "stop": ["\udc00"]}, "stop.0"),
            ("/v1/chat/completions", chat_body("\udfff?", png_bytes(size=(40, 40))), "messages.0.content.1.text.text"),
        ):
            raw = json.dumps(body).encode()  # ASCII: the surrogate travels as an escape
            r = await client.post(route, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
            assert "lone surrogate" in r.json()["error"]["message"]
        # images are checked side by side; of several bad ones, the error names the first by place (a cut-off PNG
        # at 1), not the one refused soonest (the bomb at 2 is refused from its header alone)
        noise = io.BytesIO()  # slow to decode: noise does not compress, and the cut comes near the end
        Image.frombytes("RGB", (1200, 1200), random.Random(5).randbytes(3 * 1200 * 1200)).save(noise, "PNG")
        cut = noise.getvalue()[: len(noise.getvalue()) * 9 // 10]
        mixed = chat_body("Which?", [png_bytes(size=(40, 40)), cut, bomb_png(side, side)])
        r = await client.post("/v1/chat/completions", json=mixed)
        assert r.status_code == 400 and "image 1 could not be decoded" in r.json()["error"]["message"], r.text
        ok = await client.post("/v1/chat/completions", json=chat_body("Still there?"))
        assert ok.status_code == 200


@pytest.mark.e2e
async def test_stream_options_include_usage(cluster: Cluster) -> None:
    body = {**chat_body("Hello there."), "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
        r = await client.post("/v1/chat/completions", json=body)
        plain = await client.post("/v1/chat/completions", json=chat_body("Hello there."))
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain.json()["usage"]
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        == (plain.json()["choices"][0]["message"]["content"])
    )


class ImageHost:
    """A local web server for remote-image tests: an image, a too-large one, a slow one, a redirect."""

    def __init__(self, image: bytes) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/slow.png":
                    time.sleep(3)
                if self.path == "/moved.png":
                    self.send_response(302)
                    self.send_header("Location", "http://example.invalid/x.png")
                    self.end_headers()
                    return
                body = image + bytes(200_000) if self.path == "/big.png" else image
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the gateway stopped reading at its size limit: as it should

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def url_body(url: str) -> dict:
    body = chat_body("What color is the shape?")
    body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": url}})
    return body


@pytest.mark.e2e
@pytest.mark.parametrize("cluster", ["epd"], indirect=True)  # its gateway needs no Mooncake client in-process
async def test_remote_image_urls_only_from_allowed_hosts(cluster: Cluster) -> None:
    image = png_bytes(size=(64, 48), color=(0, 90, 200), shape="circle")
    host = ImageHost(image)
    settings = cluster.settings.replace(image_url_hosts="127.0.0.1", image_url_timeout_s=1.0, max_image_mb=0.1)
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as client:
                fetched = await client.post("/v1/chat/completions", json=url_body(host.url + "/ok.png"))
                inline = await client.post("/v1/chat/completions", json=chat_body("What color is the shape?", image))
                assert fetched.status_code == 200, fetched.text
                assert (
                    fetched.json()["choices"][0]["message"]["content"]
                    == (inline.json()["choices"][0]["message"]["content"])
                )
                other = await client.post("/v1/chat/completions", json=url_body("http://localhost:1/x.png"))
                assert other.status_code == 400 and "allow-list" in other.json()["error"]["message"]
                big = await client.post("/v1/chat/completions", json=url_body(host.url + "/big.png"))
                assert big.status_code == 413
                slow = await client.post("/v1/chat/completions", json=url_body(host.url + "/slow.png"))
                assert slow.status_code == 400 and "did not answer" in slow.json()["error"]["message"]
                moved = await client.post("/v1/chat/completions", json=url_body(host.url + "/moved.png"))
                assert moved.status_code == 400 and "302" in moved.json()["error"]["message"]
        # and with no allow-list (the default), remote URLs are refused outright
        async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
            off = await client.post("/v1/chat/completions", json=url_body(host.url + "/ok.png"))
        assert off.status_code == 400 and "disabled" in off.json()["error"]["message"]
    finally:
        host.close()


@pytest.mark.e2e
@pytest.mark.parametrize("cluster", ["epd"], indirect=True)
async def test_over_the_inflight_limit_is_429_with_retry_after(cluster: Cluster) -> None:
    app = create_app(cluster.settings.replace(max_inflight=1))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as client:
            body = {**chat_body("Go on."), "max_tokens": 300, "ignore_eos": True}  # about a second in flight
            long = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            for _ in range(100):
                if app.state.gateway.inflight:
                    break
                await asyncio.sleep(0.02)
            r = await client.post("/v1/chat/completions", json=chat_body("Me too?"))
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            # refused at the door, before its body is read: not even a malformed one gets its 400
            unread = await client.post("/v1/chat/completions", content=b"{not json")
            assert unread.status_code == 429 and unread.headers["retry-after"] == "1"
            done = await long
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 300
            assert app.state.gateway.inflight == 0
            again = await client.post("/v1/chat/completions", json=chat_body("Now?"))
            assert again.status_code == 200


@pytest.mark.integration
async def test_no_live_worker_is_503_with_retry_after(infra_settings: Settings) -> None:
    """A topology whose workers are all gone: after the grace period, fail fast instead of queueing."""
    app = create_app(infra_settings.replace(topology="epd", pool_grace_s=0.5))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            await asyncio.sleep(1.5)
            r = await client.post("/v1/chat/completions", json=chat_body("Anyone?"))
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert "no live epd worker" in r.json()["error"]["message"]
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.json()["workers"] == {"epd": 0}


@pytest.mark.integration
async def test_past_the_deadline_is_504(infra_settings: Settings) -> None:
    """Accepted but never answered (no worker consumes it here): the client gets a 504 at its deadline."""
    app = create_app(infra_settings.replace(topology="epd", request_timeout_s=1.0, pool_grace_s=60))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            started = time.monotonic()
            r = await client.post("/v1/chat/completions", json=chat_body("Hello?"))
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
            assert 1.0 <= time.monotonic() - started < 10


@pytest.mark.e2e
async def test_a_prompt_over_the_model_length_is_400(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
        r = await client.post("/v1/chat/completions", json=chat_body("word " * 5000))
        assert r.status_code == 400 and "maximum length is 4096" in r.json()["error"]["message"]
        ok = await client.post("/v1/chat/completions", json=chat_body("Short."))
        assert ok.status_code == 200


def whole_but_undecodable_png() -> bytes:
    """A PNG whose every chunk is there with its checksum right, but whose pixel data is no deflate stream: only
    decoding it tells."""
    data = png_bytes(size=(64, 48))
    at = data.index(b"IDAT") - 4
    length = int.from_bytes(data[at : at + 4], "big")
    garbage = bytes(random.Random(3).randrange(256) for _ in range(length))
    crc = zlib.crc32(b"IDAT" + garbage).to_bytes(4, "big")
    return data[: at + 8] + garbage + crc + data[at + 12 + length :]


@pytest.mark.e2e
async def test_an_image_the_gateway_passes_but_that_cannot_be_decoded_is_400_from_the_encoder(
    cluster: Cluster,
) -> None:
    """The gateway checks a picture's header and structure, not its pixels (core/images.check_image): the worker
    that decodes it answers the caller, naming the image, and serves on."""
    bad = whole_but_undecodable_png()
    with Image.open(io.BytesIO(bad)) as probe:
        probe.verify()  # whole, as far as a check without decoding can tell
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as client:
        r = await client.post("/v1/chat/completions", json=chat_body("Which?", [png_bytes(size=(40, 40)), bad]))
        assert r.status_code == 400 and "image 1 could not be decoded" in r.json()["error"]["message"], r.text
        ok = await client.post("/v1/chat/completions", json=chat_body("Still there?", png_bytes(size=(40, 40))))
        assert ok.status_code == 200
