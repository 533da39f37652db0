"""EC and KV connectors against a real Mooncake master."""

import asyncio
from pathlib import Path

import pytest
import torch
from epd.connectors.ec import entry_parts, entry_room, unpack_entry, write_entry
from epd.connectors.ec_memory import InProcessECConnector
from epd.connectors.ec_mooncake import KEY_PREFIX, MooncakeECConnector
from epd.connectors.ec_shared_dir import SharedDirECConnector
from epd.connectors.kv import KVTransferError
from epd.connectors.kv_mooncake import MooncakeStoreKVConnector
from epd.connectors.mooncake_store import MooncakeStore
from epd.connectors.tensors import TensorIntegrityError, from_bytes, handle_for, to_bytes
from epd.connectors.transfer_engine import Arena
from epd.core.config import Settings
from epd.schemas.decode import KVPath

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(infra_settings: Settings):  # noqa: ANN201
    s = MooncakeStore(infra_settings)
    yield s
    s.close()


EMBEDDING_BYTES = 12 * 64 * 2  # the suite's embeddings: (12, 64) bfloat16


@pytest.fixture(params=["mooncake", "memory", "shared-dir"])
def ec(request: pytest.FixtureRequest, store: MooncakeStore, tmp_path: Path):  # noqa: ANN201
    """Every backend, bounded where it is ours to bound: room for two of the suite's embeddings and a half."""
    if request.param == "mooncake":
        return MooncakeECConnector(store)
    if request.param == "memory":
        return InProcessECConnector(int(2.5 * EMBEDDING_BYTES))
    return SharedDirECConnector(tmp_path / "ec", int(2.5 * (EMBEDDING_BYTES + 200)))  # + a file's header


async def vanish(ec, key: str, store: MooncakeStore) -> None:  # noqa: ANN001
    """Take an entry away behind the connector's back, as eviction (Mooncake's, another worker's) does."""
    if isinstance(ec, MooncakeECConnector):
        assert await store.remove(KEY_PREFIX + key)
    elif isinstance(ec, SharedDirECConnector):
        ec.path(key).unlink()
    else:
        ec._entries.pop(key)


def unique(name: str) -> str:
    return f"{name}-{torch.randint(0, 10**12, ()).item()}"


async def test_ec_save_load_exists_and_miss(ec) -> None:  # noqa: ANN001
    emb = torch.randn(12, 64, dtype=torch.bfloat16)
    key = f"test-{id(ec)}-{torch.randint(0, 10**9, ()).item()}"
    assert await ec.exists([key, key + "x"]) == [False, False]
    assert await ec.load(key) is None  # a miss, not an error
    ref = await ec.save(key, emb, [1, 6, 8])
    assert ref.key == key and ref.grid_thw == [1, 6, 8]
    assert await ec.exists([key, key + "x"]) == [True, False]
    got, grid = await ec.load(key)
    assert grid == [1, 6, 8] and got.dtype == torch.bfloat16 and torch.equal(got, emb)
    await ec.save(key, emb * 2, [1, 6, 8])  # rewriting a key replaces the value
    assert torch.equal((await ec.load(key))[0], emb * 2)


async def test_ec_batch_save_and_load_equal_one_at_a_time(ec, store: MooncakeStore) -> None:  # noqa: ANN001
    keys = [unique("batch") for _ in range(2)]
    embeddings = [torch.randn(12, 64, dtype=torch.bfloat16), torch.randn(12, 64, dtype=torch.bfloat16)]
    refs = await ec.save_many([(k, e, [1, 6, 8]) for k, e in zip(keys, embeddings, strict=True)])
    assert [r.key for r in refs] == keys
    loaded = await ec.load_many([keys[1], "never-saved", keys[0], keys[1]])  # (the same image twice)
    assert loaded[1] is None  # a miss in a batch is a miss, not an error
    assert torch.equal(loaded[0][0], embeddings[1]) and torch.equal(loaded[2][0], embeddings[0])
    assert torch.equal(loaded[3][0], embeddings[1])
    assert loaded[0][1] == loaded[2][1] == [1, 6, 8]
    one = await ec.load(keys[0])  # what the batch saved, one load reads, bit for bit
    assert torch.equal(one[0], embeddings[0])
    await ec.save(keys[1], embeddings[1] * 3, [1, 6, 8])  # and what one save wrote, the batch reads
    assert torch.equal((await ec.load_many([keys[1]]))[0][0], embeddings[1] * 3)
    if isinstance(ec, MooncakeECConnector):  # a batch larger than the registered buffer goes one by one
        big = [(unique("big"), torch.randn(1024, 3584, dtype=torch.bfloat16), [1, 64, 64]) for _ in range(2)]
        buffer, store._arena = store._arena, Arena(8 << 20)  # room for one of them, not both
        try:
            await ec.save_many(big)
            for (key, emb, _), got in zip(big, await ec.load_many([k for k, _, _ in big]), strict=True):
                assert torch.equal(got[0], emb)
                for _ in range(50):  # (a read pins a key for the lease TTL)
                    if await store.remove(KEY_PREFIX + key):
                        break
                    await asyncio.sleep(0.05)
        finally:
            store._arena = buffer


async def test_ec_an_entry_that_vanished_is_a_miss(ec, store: MooncakeStore) -> None:  # noqa: ANN001
    key = unique("vanish")
    await ec.save(key, torch.randn(12, 64, dtype=torch.bfloat16), [1, 6, 8])
    await vanish(ec, key, store)
    assert await ec.exists([key]) == [False]
    assert await ec.load(key) is None


async def test_mooncake_a_damaged_entry_is_a_miss(store: MooncakeStore) -> None:
    ec = MooncakeECConnector(store)
    key = unique("damaged")
    emb = torch.randn(12, 64, dtype=torch.bfloat16)
    await ec.save(key, emb, [1, 6, 8])
    header, flat, _ = entry_parts(key, emb, [1, 6, 8])
    flipped = bytearray(flat.numpy().tobytes())
    flipped[-1] ^= 0xFF
    await store.upsert(KEY_PREFIX + key, header + bytes(flipped))
    assert await ec.load_many([key]) == [None]  # a miss, never an error: the image is encoded again
    await store.upsert(KEY_PREFIX + key, b"\x00\x00")  # not even a header
    assert await ec.load(key) is None
    await ec.save(key, emb, [1, 6, 8])  # the encoder's save replaces it
    assert torch.equal((await ec.load(key))[0], emb)


@pytest.mark.parametrize("bounded", ["memory", "shared-dir"])
async def test_ec_a_full_cache_evicts_the_least_recently_used(bounded: str, tmp_path: Path) -> None:
    ec = (
        InProcessECConnector(int(2.5 * EMBEDDING_BYTES))
        if bounded == "memory"
        else SharedDirECConnector(tmp_path / "ec", int(2.5 * (EMBEDDING_BYTES + 200)))
    )
    a, b, c = (torch.full((12, 64), float(i), dtype=torch.bfloat16) for i in range(3))
    await ec.save("a", a, [1, 6, 8])
    await asyncio.sleep(0.01)
    await ec.save("b", b, [1, 6, 8])
    await asyncio.sleep(0.01)
    assert torch.equal((await ec.load("a"))[0], a)  # a used after b: b is now the least recent
    await asyncio.sleep(0.01)
    await ec.save("c", c, [1, 6, 8])
    assert await ec.exists(["a", "b", "c"]) == [True, False, True]
    assert ec.usage_bytes() <= ec.capacity_bytes


async def test_shared_dir_writes_whole_entries_and_checks_them(tmp_path: Path) -> None:
    ec = SharedDirECConnector(tmp_path / "ec", 1 << 30)
    versions = [torch.full((64, 256), float(i)) for i in range(20)]

    async def rewrite() -> None:
        for v in versions:
            await ec.save("k", v, [1, 8, 32])

    async def read() -> list:
        seen = []
        for _ in range(60):
            hit = await ec.load("k")
            if hit is not None:
                seen.append(hit[0])
            await asyncio.sleep(0)
        return seen

    _, seen = await asyncio.gather(rewrite(), read())
    assert seen and all(any(torch.equal(t, v) for v in versions) for t in seen)  # never a part of one
    assert [f.name for f in (tmp_path / "ec").iterdir()] == ["k.safetensors"]  # no temporary file left
    data = bytearray(ec.path("k").read_bytes())
    data[-1] ^= 0xFF  # one bit of the tensor's bytes
    ec.path("k").write_bytes(bytes(data))
    lax = SharedDirECConnector(tmp_path / "ec", 1 << 30, verify=False)
    assert (await lax.load("k")) is not None  # EPD_VERIFY_CHECKSUMS=off reads it as it is
    assert await ec.load("k") is None  # damaged: a miss, never an error; and it goes, to be encoded anew
    assert await ec.exists(["k"]) == [False]
    ec.path("k").write_bytes(b"not a safetensors file")
    assert await ec.load("k") is None and await ec.exists(["k"]) == [False]
    with pytest.raises(ValueError, match="plain file name"):
        ec.path("../escape")
    # an entry from before checksums were XXH3-64 is a miss, and goes: the encoder writes it anew
    from safetensors.torch import save_file

    save_file({"embedding": versions[0]}, ec.path("old"), metadata={"grid_thw": "[1, 8, 32]", "xxh64": "1"})
    assert await ec.load("old") is None and await ec.exists(["old"]) == [False]


async def test_kv_send_recv_release(store: MooncakeStore) -> None:
    kv_conn = MooncakeStoreKVConnector(store, lease_wait_s=0.25)
    kv = torch.randn(2, 2, 2, 67, 16)
    handle = await kv_conn.send("req-kv-1", kv)
    assert handle.path is KVPath.STORE and handle.tensor.shape == [2, 2, 2, 67, 16] and handle.nbytes == kv.numel() * 4
    assert torch.equal(await kv_conn.recv(handle), kv)
    await kv_conn.release(handle)
    for _ in range(10):  # bounded; polls slower than the lease, since a check pins the key too
        await asyncio.sleep(0.5)
        if not (await store.exists([handle.tensor.key]))[0]:
            break
    assert not (await store.exists([handle.tensor.key]))[0]
    with pytest.raises(KVTransferError, match="not in the store"):
        await kv_conn.recv(handle)


async def test_kv_written_layer_by_layer_goes_to_the_store_at_finish(store: MooncakeStore) -> None:
    """The store path's writer (prefill hands it each layer as the forward computes it): nothing is in the
    store before `finish`; an abort leaves nothing; a layer missing fails `finish`."""
    kv_conn = MooncakeStoreKVConnector(store, lease_wait_s=0.25)
    kv = torch.randn(3, 2, 2, 19, 16)
    writer = await kv_conn.open("req-kv-layers", tuple(kv.shape), kv.dtype)
    for layer in range(kv.shape[0]):
        writer.write_layer(layer, kv[layer, 0], kv[layer, 1])
    assert not (await store.exists([writer.key]))[0]
    handle = await writer.finish()
    assert handle.path is KVPath.STORE and torch.equal(await kv_conn.recv(handle), kv)
    await kv_conn.release(handle)
    short = await kv_conn.open("req-kv-short", tuple(kv.shape), kv.dtype)
    short.write_layer(0, kv[0, 0], kv[0, 1])
    with pytest.raises(KVTransferError, match="1 of 3 layers"):
        await short.finish()
    assert not (await store.exists([short.key]))[0]


@pytest.mark.parametrize("staging", ["shared buffer", "registered for the call"])
async def test_kv_larger_than_the_clients_transfer_buffer(store: MooncakeStore, staging: str) -> None:
    """A long prompt's KV (here 20 MiB) is over the 16 MiB the store client's own put and get can stage."""
    kv = torch.randn(4, 2, 4, 640, 128, dtype=torch.bfloat16)
    kv_conn = MooncakeStoreKVConnector(store, lease_wait_s=0.25)
    buffer = store._arena
    if staging == "registered for the call":  # the staging buffer has no room for it
        store._arena = Arena(1 << 20)
    try:
        handle = await kv_conn.send(f"req-long-{staging}", kv)
        assert torch.equal(await kv_conn.recv(handle), kv)
    finally:
        store._arena = buffer
    await kv_conn.release(handle)
    for _ in range(10):
        await asyncio.sleep(0.5)
        if not (await store.exists([handle.tensor.key]))[0]:
            break
    assert not (await store.exists([handle.tensor.key]))[0]


async def test_a_store_writes_its_segment_through_at_start_and_frees_it(infra_settings: Settings) -> None:
    """Start-up writes every page of the segment once (no request pays for first touches), in
    64 MiB values that it removes: none is left to take room from the cache."""
    s = MooncakeStore(infra_settings, segment_mb=100)
    try:
        touched = [f"epd/touch/{s._store.get_hostname()}/{i}" for i in range(2)]
        assert await s.exists(touched) == [False, False]
        value = torch.randn(60 << 18)  # 60 MiB: would not fit beside a leftover
        await s.upsert("after-touch", value)
        assert (await s.get("after-touch")) == bytearray(to_bytes(value))
        for _ in range(50):  # the read's lease (200 ms here) pins the key: removal is refused until it ends
            if await s.remove("after-touch"):
                break
            await asyncio.sleep(0.1)
        assert not (await s.exists(["after-touch"]))[0]
    finally:
        s.close()


def test_integrity_checks_name_what_is_wrong() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    data = to_bytes(t)
    h = handle_for("k", t, data)
    assert torch.equal(from_bytes(data, h), t)
    with pytest.raises(TensorIntegrityError, match="checksum"):
        from_bytes(data[:-1] + b"\x00", h)
    assert from_bytes(data[:-1] + b"\x00", h, verify=False).shape == (2, 3)  # the flag off: bytes as they are
    with pytest.raises(TensorIntegrityError, match="bytes, handle says"):
        from_bytes(data[:-4], h)
    bad_shape = handle_for("k", t, data)
    bad_shape.shape = [4, 3]
    with pytest.raises(TensorIntegrityError, match="shape"):
        from_bytes(data, bad_shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_entry_written_in_place_is_the_entry_bit_for_bit(dtype: torch.dtype) -> None:
    """`write_entry` (one copy into registered memory, header after the checksum) gives `entry_parts`' value, for
    checksums of every encoded length (the header goes just before the tensor, its room sized for the longest)."""
    gen = torch.Generator().manual_seed(0)
    for n in range(40):
        t = torch.randn(3 + n, 8, generator=gen).to(dtype)
        header, flat, ref = entry_parts(f"k{n}", t, [1, 2, 2])
        room = entry_room(f"k{n}", t, [1, 2, 2])
        slot = torch.full((room,), 0xAB, dtype=torch.uint8)
        value, written = write_entry(slot, f"k{n}", t, [1, 2, 2])
        assert bytes(value.numpy()) == header + bytes(flat.numpy())
        assert written == ref
        assert value.data_ptr() + value.numel() == slot.data_ptr() + room  # a suffix of its slot
        got, grid = unpack_entry(bytes(value.numpy()))
        assert torch.equal(got, t) and grid == [1, 2, 2]


@pytest.mark.e2e
async def test_e_p_d_on_a_shared_directory_cache_gives_generates_tokens(tiny_model: Path, tmp_path: Path) -> None:
    from .conftest import MAX_NEW, chat_body, png_bytes, post, start_cluster
    from .oracle import reference

    shared = tmp_path / "ec-shared"
    cluster = start_cluster(tiny_model, tmp_path / "c", "e-p-d", ec_backend="shared-dir", ec_dir=str(shared))
    try:
        image = png_bytes(size=(96, 72), color=(220, 200, 20), shape="circle")
        _, expected = reference(tiny_model, "What color is the shape?", image, MAX_NEW)
        for _ in range(2):  # encoded, then loaded from the directory
            r = await post(cluster, chat_body("What color is the shape?", image))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected
        [entry] = list(shared.glob("*.safetensors"))  # one entry, written by the encoder
        data = bytearray(entry.read_bytes())
        for i in range(1, 9):  # bytes flipped in the tensor: a miss, encoded again, never an error
            data[-i] ^= 0x5A
        entry.write_bytes(bytes(data))
        r = await post(cluster, chat_body("What color is the shape?", image))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
        assert entry.read_bytes() != bytes(data)  # written anew
    finally:
        cluster.stop()


@pytest.mark.e2e
async def test_e_p_d_a_damaged_mooncake_entry_is_encoded_again(tiny_model: Path, tmp_path: Path) -> None:
    """The damaged entry stays in the store (the router sees it exist, so the request skips the encoders):
    prefill finds it unusable and sends the image to an encoder to be encoded anyway, overwriting it."""
    from epd.connectors.keys import KeySpace

    from .conftest import MAX_NEW, chat_body, png_bytes, post, start_cluster
    from .oracle import reference

    cluster = start_cluster(tiny_model, tmp_path / "c", "e-p-d")
    store = MooncakeStore(cluster.settings, segment_mb=0)
    try:
        image = png_bytes(size=(80, 64), color=(20, 200, 220), shape="circle")
        _, expected = reference(tiny_model, "What color is the shape?", image, MAX_NEW)
        r = await post(cluster, chat_body("What color is the shape?", image))
        assert r.json()["choices"][0]["message"]["content"] == expected
        key = KEY_PREFIX + KeySpace.for_checkpoint(tiny_model).key(image)
        for garbage in (b"\x07" * 64, None):  # a damaged value, then one with a flipped tensor byte
            value = await store.get(key)
            assert value is not None
            if garbage is None:
                value[-1] ^= 0xFF
            await store.upsert(key, bytes(value) if garbage is None else garbage)
            r = await post(cluster, chat_body("What color is the shape?", image))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected
    finally:
        store.close()
        cluster.stop()
