"""How the installed transformers calls our cache views, checked against its own uncached forward.

The engine hands transformers' text model a cache object of its own (`PrefillView`, `StepView`). Releases have
changed how the layers call it (5.24: `update(..., kwargs=...)`, and the forward's `past_key_values` renamed
`cache`). If a release changes it again, these tests fail naming the convention, instead of every request
failing (or, worse, decoding without its cache).
"""

from pathlib import Path

import pytest
import torch
from epd.workers.engine import load_family
from epd.workers.engine.checkpoint import Checkpoint
from epd.workers.engine.family import cache_argument
from epd.workers.engine.kv_cache import PagedKVCache, layer_of

from .conftest import engine_prompt

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def engine(tiny_model: Path):  # noqa: ANN201
    ckpt = Checkpoint.open(tiny_model)
    return ckpt, load_family(ckpt)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((3,), {}), ((3, {"cache_position": None}), {}), ((3,), {"kwargs": {}}), ((), {"layer_idx": 3})],
    ids=["positional", "positional+cache_kwargs", "5.24-kwargs", "layer_idx-keyword"],
)
def test_every_known_update_convention_names_the_layer(args: tuple, kwargs: dict) -> None:
    assert layer_of(args, kwargs) == 3


def test_an_unknown_update_convention_fails_naming_the_call() -> None:
    with pytest.raises(TypeError, match=r"Cache.update\(keys, values, \*\(\), \*\*\['layer'\]\).*not supported"):
        layer_of((), {"layer": 3})


def test_the_text_model_takes_our_cache_under_a_name_it_declares(engine) -> None:  # noqa: ANN001
    _, family = engine
    assert cache_argument(family.text) in ("cache", "past_key_values")


def test_prefill_and_a_cached_decode_step_equal_the_uncached_forward(engine) -> None:  # noqa: ANN001
    ckpt, family = engine
    ids, images = engine_prompt(ckpt, family, "Hello, how are you today?", [])
    out = family.prefill(ids, images)
    layers = family.text.config.num_hidden_layers
    assert sorted(out.view.keys) == list(range(layers)), "prefill: the layers did not hand their KV to our cache"
    model = family.model
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(out.logits, full[-1], rtol=1e-4, atol=1e-4)

    token = int(torch.argmax(out.logits))
    cache = PagedKVCache(family.kv_layout(), 1 << 20)
    blocks = cache.reserve(len(ids) + 1)
    cache.write(blocks, out.kv)
    step = family.decode_step([token], [len(ids) + out.rope_delta], cache.step_view([blocks], [len(ids)]))
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids + [token]])).logits[0, -1].float()
    # a cache that the layers ignored would give the logits of the lone token instead
    torch.testing.assert_close(step[0], expected, rtol=1e-4, atol=1e-4)
