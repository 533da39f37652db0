"""The engine's three operations against transformers' generate, without NATS."""

import io
from pathlib import Path

import pytest
import torch
from epd.schemas.common import ImagePart, Message, SamplingParams, TextPart
from epd.workers.engine import load_family
from epd.workers.engine.checkpoint import Checkpoint, CheckpointError
from epd.workers.engine.detokenizer import Detokenizer
from epd.workers.engine.kv_cache import PagedKVCache
from epd.workers.engine.prompt import PromptError, build_prompt
from epd.workers.engine.sampling import sample
from PIL import Image

from .conftest import engine_prompt, png_bytes
from .oracle import reference

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def engine(tiny_model: Path):  # noqa: ANN201
    ckpt = Checkpoint.open(tiny_model)
    return ckpt, load_family(ckpt)


def run_greedy(ckpt, family, question: str, image: bytes | None, max_new: int) -> list[int]:  # noqa: ANN001
    ids, encoded = engine_prompt(ckpt, family, question, [image] if image else [])
    out = family.prefill(ids, encoded)
    tokens = [int(torch.argmax(out.logits))]
    cache = PagedKVCache(family.kv_layout(), 1 << 20)
    blocks = cache.reserve(len(ids))
    cache.write(blocks, out.kv.clone())  # as if shipped to another process
    while len(tokens) < max_new and tokens[-1] not in ckpt.eos_token_ids():
        length = len(ids) + len(tokens) - 1
        assert cache.grow(blocks, length + 1)  # a block more each time the last one fills
        step = cache.step_inputs([blocks], [length])
        logits = family.decode_step([tokens[-1]], [length + out.rope_delta], cache, step)
        tokens.append(int(torch.argmax(logits[0])))
    return tokens


@pytest.mark.parametrize("size", [(100, 80), (56, 56), (200, 120)])
def test_image_prompt_matches_generate(engine, tiny_model: Path, size: tuple[int, int]) -> None:  # noqa: ANN001
    image = png_bytes(size=size, color=(30, 200, 90), shape="circle")
    expected, _ = reference(tiny_model, "What shape is it?", image, 16)
    assert run_greedy(*engine, "What shape is it?", image, 16) == expected


def test_text_prompt_matches_generate(engine, tiny_model: Path) -> None:  # noqa: ANN001
    expected, _ = reference(tiny_model, "Hello, how are you today?", None, 16)
    assert run_greedy(*engine, "Hello, how are you today?", None, 16) == expected


def test_prompt_rejects_image_count_mismatch(engine) -> None:  # noqa: ANN001
    ckpt, family = engine
    msgs = [Message(role="user", content=[ImagePart(data=b""), TextPart(text="hi")])]
    with pytest.raises(PromptError, match="1 image placeholders for 2 images"):
        build_prompt(ckpt.tokenizer, ckpt.chat_template, msgs, [4, 4], family.image_token_id)


def test_unsupported_checkpoint_names_supported_families(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match=r"Qwen2-VL \(qwen2_vl\), Qwen2.5-VL \(qwen2_5_vl\)"):
        Checkpoint.open(tmp_path)


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits, p, pos) for pos in range(20)]
    assert draws == [sample(logits, p, pos) for pos in range(20)]
    assert len(set(draws)) > 1  # it does sample
    assert sample(logits, SamplingParams(temperature=0.0), 0) == int(torch.argmax(logits))
    top = sample(logits, SamplingParams(temperature=1.0, top_p=1e-6, seed=1), 0)
    assert top == int(torch.argmax(logits))  # top_p this small keeps the top token only
    three = set(torch.topk(logits, 3).indices.tolist())
    hot = SamplingParams(temperature=50.0, top_k=3, seed=2)  # nearly uniform over what top_k keeps
    assert {sample(logits, hot, pos) for pos in range(60)} == three
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1, seed=4), 0) == int(torch.argmax(logits))


def test_detokenizer_deltas_add_up_to_the_whole_text(engine) -> None:  # noqa: ANN001
    ckpt, _ = engine
    ids = ckpt.tokenizer("The shape is a red circle, é ü!", add_special_tokens=False)["input_ids"]
    d = Detokenizer(ckpt.tokenizer)
    assert "".join(d.push([i]) for i in ids) == ckpt.tokenizer.decode(ids)


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [1e-300, 1e-6, 1e-4])
def test_tiny_temperatures_sample_the_top_token_without_overflow(temperature: float) -> None:
    """Found by the fuzzer: logits / 1e-300 overflowed to inf and softmax gave NaN (a 500)."""
    logits = torch.tensor([1.0, 7.5, -3.0, 7.0])
    assert sample(logits, SamplingParams(temperature=temperature, seed=1), position=0) == 1


@pytest.mark.unit
def test_stop_strings_cut_the_text_and_never_send_part_of_a_stop_early() -> None:
    from epd.workers.engine.stops import StopStrings

    s = StopStrings(["o w", "zzz"])
    assert s.add("Hel", final=False) == ("H", False)  # "el" held back: it could begin "zzz"
    assert s.add("lo w", final=False) == ("ell", True)  # "o w" spans two pieces; nothing of it is sent
    across = StopStrings(["abc"])
    assert [across.add(p, final=False) for p in ("xa", "b", "cd")] == [("", False), ("x", False), ("", True)]
    free = StopStrings([])
    assert free.add("any text", final=False) == ("any text", False)  # no stops: nothing held back
    held = StopStrings(["!!"])
    assert held.add("hi!", final=False) == ("hi", False)
    assert held.add("?", final=True) == ("!?", False)  # the end flushes what was held


def test_a_sharded_checkpoint_loads_and_each_half_alone_computes_what_the_whole_does(
    engine,
    tiny_model: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    from epd.tools.tiny_model import reshard

    ckpt, full = engine
    sharded = reshard(tiny_model, tmp_path / "sharded", "300KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("model-*"))) > 2
    vision = load_family(Checkpoint.open(sharded), parts="vision")
    language = load_family(Checkpoint.open(sharded), parts="language")
    assert vision.model.model.language_model is None and vision.model.lm_head is None
    assert language.model.model.visual is None
    image = Image.open(io.BytesIO(png_bytes(size=(90, 70), shape="circle"))).convert("RGB")
    whole, alone = full.encode([image])[0], vision.encode([image])[0]
    assert torch.equal(whole.embedding, alone.embedding) and whole.grid_thw == alone.grid_thw
    ids = build_prompt(
        ckpt.tokenizer,
        ckpt.chat_template,
        [Message(role="user", content=[ImagePart(data=b""), TextPart(text="What is it?")])],
        [full.image_tokens(whole.grid_thw)],
        full.image_token_id,
    )
    a, b = full.prefill(ids, [whole]), language.prefill(ids, [alone])
    assert torch.equal(a.kv, b.kv) and torch.equal(a.logits, b.logits)


def test_devices_are_checked_and_npu_needs_torch_npu(engine) -> None:  # noqa: ANN001
    ckpt, _ = engine
    with pytest.raises(ValueError, match="torch_npu"):
        load_family(ckpt, device="npu:0")  # not installed here: a clear error, not an ImportError
    with pytest.raises(ValueError, match="cpu, cuda"):
        load_family(ckpt, device="tpu:0")
    with pytest.raises(ValueError, match="parts"):
        load_family(ckpt, parts="everything")  # type: ignore[arg-type]
