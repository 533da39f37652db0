"""EC and KV connectors against a real Mooncake master."""

import asyncio

import pytest
import torch
from epd.connectors.ec_memory import InProcessECConnector
from epd.connectors.ec_mooncake import MooncakeECConnector
from epd.connectors.kv import KVTransferError
from epd.connectors.kv_mooncake import MooncakeStoreKVConnector
from epd.connectors.mooncake_store import MooncakeStore
from epd.connectors.tensors import TensorIntegrityError, from_bytes, handle_for, to_bytes
from epd.ops.config import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(infra_settings: Settings):  # noqa: ANN201
    s = MooncakeStore(infra_settings)
    yield s
    s.close()


@pytest.fixture(params=["mooncake", "memory"])
def ec(request: pytest.FixtureRequest, store: MooncakeStore):  # noqa: ANN201
    return MooncakeECConnector(store) if request.param == "mooncake" else InProcessECConnector()


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


async def test_kv_send_recv_release(store: MooncakeStore) -> None:
    kv_conn = MooncakeStoreKVConnector(store, lease_wait_s=0.25)
    kv = torch.randn(2, 2, 2, 67, 16)
    handle = await kv_conn.send("req-kv-1", kv)
    assert handle.shape == [2, 2, 2, 67, 16] and handle.nbytes == kv.numel() * 4
    assert torch.equal(await kv_conn.recv(handle), kv)
    await kv_conn.release(handle)
    for _ in range(10):  # bounded; polls slower than the lease, since a check pins the key too
        await asyncio.sleep(0.5)
        if not (await store.exists([handle.key]))[0]:
            break
    assert not (await store.exists([handle.key]))[0]
    with pytest.raises(KVTransferError, match="not in the store"):
        await kv_conn.recv(handle)


def test_integrity_checks_name_what_is_wrong() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    data = to_bytes(t)
    h = handle_for("k", t, data)
    assert torch.equal(from_bytes(data, h), t)
    with pytest.raises(TensorIntegrityError, match="checksum"):
        from_bytes(data[:-1] + b"\x00", h)
    with pytest.raises(TensorIntegrityError, match="bytes, handle says"):
        from_bytes(data[:-4], h)
    bad_shape = handle_for("k", t, data)
    bad_shape.shape = [4, 3]
    with pytest.raises(TensorIntegrityError, match="shape"):
        from_bytes(data, bad_shape)
