"""EC connector on a shared directory: one safetensors file per key, on a volume every worker mounts.

The reference pathway when no Mooncake master is wanted: an NFS share, a host volume
in compose. Writes are atomic (a temporary file in the same directory, then a rename),
so a reader sees a whole entry or none. The directory is bounded: after each save the
least recently used files go until the total fits `capacity_bytes`; a load marks its
file used. A file that vanished between `exists` and `load` (evicted by another
worker) is a miss; so is a damaged one (unreadable, or its checksum does not match), which goes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import uuid
from pathlib import Path

import torch
from epd.connectors.ec import ECConnector
from epd.connectors.tensors import checksum, handle_for, to_bytes
from epd.schemas.common import ImageEmbedding
from safetensors import SafetensorError
from safetensors.torch import load, save_file

SUFFIX = ".safetensors"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9._-]+$")
log = logging.getLogger(__name__)


class SharedDirECConnector(ECConnector):
    def __init__(self, root: str | Path, capacity_bytes: int, verify: bool = True) -> None:
        """`verify`: check each entry's checksum (kept in its metadata) on load."""
        self.root, self.capacity_bytes, self.verify = Path(root), capacity_bytes, verify
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not _SAFE_KEY.match(key) or key.startswith("."):
            raise ValueError(f"encoder-cache key {key!r} is not a plain file name")
        return self.root / (key + SUFFIX)

    async def exists(self, keys: list[str]) -> list[bool]:
        return [self.path(k).exists() for k in keys]

    async def save(self, key: str, embedding: torch.Tensor, grid_thw: list[int]) -> ImageEmbedding:
        return await asyncio.to_thread(self._save, key, embedding, list(grid_thw))

    async def load(self, key: str) -> tuple[torch.Tensor, list[int]] | None:
        return await asyncio.to_thread(self._load, key)

    def usage_bytes(self) -> int:
        return sum(f.stat().st_size for f in self._entries())

    def _entries(self) -> list[Path]:
        return [f for f in self.root.iterdir() if f.name.endswith(SUFFIX) and not f.name.startswith(".")]

    def _save(self, key: str, embedding: torch.Tensor, grid_thw: list[int]) -> ImageEmbedding:
        tensor = embedding.detach().contiguous().cpu()
        final = self.path(key)
        temp = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        handle = handle_for(key, tensor, to_bytes(tensor))
        try:
            metadata = {"grid_thw": json.dumps(grid_thw), "xxh3_64": str(handle.checksum)}
            save_file({"embedding": tensor}, temp, metadata=metadata)
            os.replace(temp, final)  # atomic: readers see the old entry or the new one, never a part
        finally:
            temp.unlink(missing_ok=True)
        self._evict(keep=final)
        return ImageEmbedding(key=key, grid_thw=grid_thw, tensor=handle)

    def _load(self, key: str) -> tuple[torch.Tensor, list[int]] | None:
        path = self.path(key)
        try:
            # One read of one open file: a concurrent rewrite renames a new file in, and reading by path
            # twice (header, then data) could mix two versions.
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # used now: the last to be evicted
        except FileNotFoundError:
            return None
        try:
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            metadata = header["__metadata__"]
            if "xxh64" in metadata:  # written before checksums were XXH3-64: a miss, encoded again
                path.unlink(missing_ok=True)
                return None
            grid, expected = json.loads(metadata["grid_thw"]), int(metadata["xxh3_64"])
            embedding = load(data)["embedding"]
        except (SafetensorError, ValueError, KeyError) as e:
            return self._damaged(path, f"not a valid encoder-cache entry: {e!r}")
        if self.verify and checksum(to_bytes(embedding)) != expected:
            return self._damaged(path, "checksum mismatch")
        return embedding, grid

    def _damaged(self, path: Path, why: str) -> None:
        """A damaged entry is a miss, and goes: the image is encoded again into a whole new file."""
        log.warning("encoder-cache entry %s is damaged (%s): removed, a miss", path.name, why)
        path.unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        """Remove least recently used files until the directory fits; never the entry just written."""
        files = []
        for f in self._entries():
            try:
                st = f.stat()
            except FileNotFoundError:  # another worker evicted it meanwhile
                continue
            files.append((st.st_mtime_ns, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files, key=lambda e: e[0]):
            if total <= self.capacity_bytes:
                break
            if f == keep:
                continue
            f.unlink(missing_ok=True)
            total -= size
