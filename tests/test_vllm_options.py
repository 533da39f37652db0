"""The engine arguments a `--engine vllm` worker gives vLLM, from epd's settings (no vLLM needed to build them)."""

from pathlib import Path

from epd.core.config import Settings
from epd.workers.vllm_engine import ENCODER_KV_BYTES, engine_options

MODEL = Path("/models/some-checkpoint")


def test_on_a_gpu_vllm_records_graphs_and_keeps_to_epds_kv_budget() -> None:
    s = Settings(model=MODEL, device="cuda:0", kv_cache_mb=24576, max_seqs=64, max_batch=8)
    pd = engine_options("pd", s)
    assert pd["enforce_eager"] is False
    assert pd["kv_cache_memory_bytes"] == 24576 << 20  # not vLLM's default share of the whole GPU
    assert pd["max_num_seqs"] == 64  # as many running sequences as epd's own decoder keeps
    assert pd["ec_transfer_config"]["ec_role"] == "ec_both"
    encode = engine_options("encode", s)
    assert encode["kv_cache_memory_bytes"] == ENCODER_KV_BYTES and encode["max_num_seqs"] == 8
    assert engine_options("epd", s)["ec_transfer_config"] is None  # epd encodes in process, no shared cache


def test_on_the_cpu_vllm_runs_eagerly_with_its_own_kv_sizing() -> None:
    s = Settings(model=MODEL, device="cpu", kv_cache_mb=24576, max_seqs=2)
    pd = engine_options("pd", s)
    assert pd["enforce_eager"] is True and "kv_cache_memory_bytes" not in pd and pd["max_num_seqs"] == 2
