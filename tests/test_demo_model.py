"""The demo model that ships with the project: it tells the color and the shape in a picture.

Graded on pictures drawn fresh (a seed training never used), through the e-p-d pipeline,
and each answer compared with transformers' `generate` on the same checkpoint.
"""

import asyncio
import base64
import io
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from epd.ops.up import Cluster
from epd.tools import shapes
from epd.tools.demo_model import SHIPPED, Recipe, train
from safetensors.torch import load_file

from .conftest import chat_body, post, start_cluster
from .oracle import reference

QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is it?"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(SHIPPED, tmp_path_factory.mktemp("demo"), "e-p-d")
    yield c
    c.stop()


def png(picture: shapes.Picture) -> bytes:
    buf = io.BytesIO()
    picture.image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.e2e
async def test_the_demo_model_answers_color_and_shape_questions(demo: Cluster) -> None:
    rng = random.Random(2026)  # training draws from seeds 0, 1 and 2
    pictures = [shapes.draw(rng) for _ in range(50)]
    asked = [(p, kind) for p in pictures for kind in QUESTIONS]
    sem = asyncio.Semaphore(8)

    async def ask(p: shapes.Picture, kind: str) -> str:
        body = {**chat_body(QUESTIONS[kind], png(p)), "model": SHIPPED.name, "max_tokens": 8}
        async with sem:
            r = await post(demo, body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    answers = await asyncio.gather(*(ask(p, kind) for p, kind in asked))
    truth = [p.color if kind == "color" else p.shape for p, kind in asked]
    right = sum(a.strip() == t for a, t in zip(answers, truth, strict=True))
    assert right >= 0.95 * len(asked), list(zip(answers, truth, strict=True))
    for (p, kind), answer in zip(asked, answers, strict=True):  # the pipeline is the model, exactly
        assert answer == reference(SHIPPED, QUESTIONS[kind], png(p), 8)[1]


README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.e2e
async def test_the_readme_nats_example_runs(demo: Cluster) -> None:
    section = README.read_text().split("## NATS-native API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the example exactly as a reader copies it
    text = await namespace["ask"](demo.settings.nats_url)
    assert text == reference(SHIPPED, "Hello!", None, 16)[1]


@pytest.mark.e2e
async def test_the_readme_red_circle_gets_its_shape_and_color(demo: Cluster) -> None:
    """The README's first example, its picture made by its own command: 'circle', then 'red'."""
    section = README.read_text().split("Ask it about a picture", 1)[1]
    snippet = re.search(r'IMG=\$\(\.venv/bin/python -c "(.*?)"\)', section, re.S).group(1)
    made = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True)
    image = base64.b64decode(made.stdout)
    for question, expected in (("What shape is it?", "circle"), ("What color is the shape?", "red")):
        assert question in section
        body = {**chat_body(question, image), "model": SHIPPED.name, "max_tokens": 8}
        r = await post(demo, body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == expected


@pytest.mark.unit
def test_the_shipped_weights_are_small() -> None:
    weights = SHIPPED / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    assert {"config.json", "tokenizer.json", "preprocessor_config.json", "chat_template.json"} <= {
        f.name for f in SHIPPED.iterdir()
    }


@pytest.mark.unit
def test_training_is_deterministic(tmp_path: Path) -> None:
    recipe = Recipe(steps=3, vision_steps=3, batch=4)
    runs = [load_file(train(tmp_path / str(i), recipe, log=False) / "model.safetensors") for i in range(2)]
    assert runs[0].keys() == runs[1].keys()
    assert all(runs[0][k].equal(runs[1][k]) for k in runs[0])
    initial = Recipe(
        steps=0, vision_steps=0, batch=4
    )  # and training moved the weights: the check above compares something
    start = load_file(train(tmp_path / "init", initial, log=False) / "model.safetensors")
    assert any(not start[k].equal(runs[0][k]) for k in start)
