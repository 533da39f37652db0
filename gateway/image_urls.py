"""Image URLs in requests: base64 `data:` URLs always; `http(s)` ones only from allowed hosts, when enabled.

Remote fetching is off unless `EPD_IMAGE_URL_HOSTS` names the hosts it may reach; each fetch is bounded
in size (`EPD_MAX_IMAGE_MB`) and time (`EPD_IMAGE_URL_TIMEOUT_S`), and redirects are not followed (one
could lead off the allow-list).
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import urlsplit

import httpx
from epd.core.config import Settings

from .errors import ApiError


class ImageUrls:
    def __init__(self, settings: Settings) -> None:
        self.hosts = settings.image_url_host_set
        self.max_bytes = int(settings.max_image_mb * (1 << 20))
        self.timeout_s = settings.image_url_timeout_s

    async def fetch(self, url: str, index: int) -> bytes:
        if url.startswith("data:"):
            data = decode_data_url(url, index)
        elif url.startswith(("http://", "https://")):
            data = await self._remote(url, index)
        else:
            raise ApiError(400, f"image {index}: the URL must be a data: URL or http(s)", param="messages")
        if len(data) > self.max_bytes:
            raise ApiError(413, f"image {index} is {len(data)} bytes, over the limit of {self.max_bytes}")
        return data

    async def _remote(self, url: str, index: int) -> bytes:
        host = urlsplit(url).hostname or ""
        if not self.hosts:
            raise ApiError(
                400, f"image {index}: remote image URLs are disabled; send a base64 data: URL", param="messages"
            )
        if host not in self.hosts:
            raise ApiError(400, f"image {index}: host {host!r} is not on this server's allow-list", param="messages")
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
                async with client.stream("GET", url) as r:
                    if r.status_code != 200:
                        raise ApiError(400, f"image {index}: {url} answered HTTP {r.status_code}", param="messages")
                    data = bytearray()
                    async for part in r.aiter_bytes():
                        data += part
                        if len(data) > self.max_bytes:
                            raise ApiError(413, f"image {index} at {url} is over the limit of {self.max_bytes} bytes")
                    return bytes(data)
        except httpx.TimeoutException:
            raise ApiError(400, f"image {index}: {url} did not answer within {self.timeout_s:g}s") from None
        except httpx.HTTPError as e:
            raise ApiError(400, f"image {index}: could not fetch {url}: {e}", param="messages") from None


def decode_data_url(url: str, index: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"image {index}: data URL must be of the form data:<mime>;base64,<data>", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image {index}: data URL payload is not valid base64", param="messages") from None
