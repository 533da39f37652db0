"""Train the demo model: a small Qwen2-VL that tells the color and the shape in a picture.

`python -m epd.tools.demo_model OUT` writes a full checkpoint directory (tokenizer,
image processor, chat template, safetensors weights). It is deterministic: seeded
data, seeded initialization, a fixed number of CPU threads and torch's
deterministic algorithms, so the same command gives the same weights on one machine.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epd.core.config import DEMO_MODEL
from epd.tools import shapes
from epd.tools.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, qwen2_vl_config, save_checkpoint

SHIPPED = DEMO_MODEL  # where it ships: the default model of `epd up`
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 25  # 4 to 25 image tokens a picture
QUESTIONS = shapes.COLOR_QUESTIONS + shapes.SHAPE_QUESTIONS + shapes.DESCRIBE_QUESTIONS

_CORPUS = " ".join(
    [*QUESTIONS, *shapes.COLORS, *shapes.SHAPES, "You are a helpful assistant.", "The shape is a"]
    + [f"a {c} {s}" for c in shapes.COLORS for s in shapes.SHAPES]
)


@dataclass
class Recipe:
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    hidden: int = 128
    layers: int = 3
    vision_width: int = 96
    seed: int = 0
    threads: int = 2
    max_pixels: int = MAX_PIXELS
    vision_steps: int = 3500  # first, the vision tower alone learns color and shape through a pooled head
    vision_lr: float = 1e-3


def _prompt(tokenizer: Any, question: str, image_tokens: int, image_token_id: int) -> list[int]:
    """The prompt ids serving builds for one picture and `question` (the same template, the same code)."""
    from epd.schemas.common import ImagePart, Message, TextPart
    from epd.workers.engine.prompt import build_prompt

    turn = Message(role="user", content=[ImagePart(data=b""), TextPart(text=question)])
    return build_prompt(tokenizer, CHAT_TEMPLATE, [turn], [image_tokens], image_token_id)


def _batch(
    rng: random.Random, n: int, tokenizer: Any, processor: Any, image_token_id: int, questions: tuple = QUESTIONS
) -> dict[str, Any]:
    """`n` fresh pictures with a random question each, padded into one training batch."""
    import torch

    pictures = [shapes.draw(rng) for _ in range(n)]
    pix = processor(images=[p.image for p in pictures], return_tensors="pt")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows, labels = [], []
    for p, grid in zip(pictures, pix["image_grid_thw"].tolist(), strict=True):
        question = rng.choice(questions)
        prompt = _prompt(tokenizer, question, grid[0] * grid[1] * grid[2] // 4, image_token_id)
        answer = tokenizer(p.answer(question), add_special_tokens=False)["input_ids"] + [end]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        "mm_token_type_ids": (ids == image_token_id).int(),
        "pixel_values": pix["pixel_values"],
        "image_grid_thw": pix["image_grid_thw"],
    }


def _accuracy(model: Any, batches: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Share of first answer tokens predicted right (teacher-forced), per kind of question."""
    import torch

    model.eval()
    out = {}
    with torch.no_grad():
        for kind, batch in batches.items():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"]
            first = (labels != -100).int().argmax(dim=1)  # the first answer position
            rows = torch.arange(labels.shape[0])
            out[kind] = (logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().mean().item()
    model.train()
    return out


def _update(loss: Any, opt: Any, sched: Any, params: Any) -> None:
    """One optimizer step on `loss`, gradients clipped to norm 1."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _pretrain_vision(model: Any, r: Recipe, rng: random.Random, processor: Any, log: bool) -> None:
    """Teach the vision tower color and shape directly: a linear head on its mean output token.

    Through the language model alone, the gradient that reaches the tower is too weak for
    shape to emerge in the steps the budget allows; with this head it does, and the
    language model then only has to learn to read what the tower already encodes.
    """
    import torch

    visual = model.model.visual
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(shapes.COLORS) + len(shapes.SHAPES))
    opt = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=r.vision_lr, weight_decay=0.01)
    total = max(1, r.vision_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.05, 1 - s / total))
    colors, kinds = list(shapes.COLORS), list(shapes.SHAPES)
    started = time.perf_counter()
    for step in range(r.vision_steps):
        pictures = [shapes.draw(rng) for _ in range(r.batch)]
        pix = processor(images=[p.image for p in pictures], return_tensors="pt")
        grid = pix["image_grid_thw"]
        tokens = visual(pix["pixel_values"], grid_thw=grid).pooler_output
        sizes = (grid.prod(-1) // 4).tolist()
        pooled = torch.stack([t.mean(0) for t in torch.split(tokens, sizes)])
        logits = head(pooled)
        color = torch.tensor([colors.index(p.color) for p in pictures])
        kind = torch.tensor([kinds.index(p.shape) for p in pictures])
        loss = torch.nn.functional.cross_entropy(logits[:, : len(colors)], color) + torch.nn.functional.cross_entropy(
            logits[:, len(colors) :], kind
        )
        _update(loss, opt, sched, visual.parameters())
        if log and (step % 50 == 0 or step == r.vision_steps - 1):
            right = (logits[:, len(colors) :].argmax(-1) == kind).float().mean().item()
            print(
                f"vision {step:5d}  loss {loss.item():.4f}  shape right in batch {right:.2f}  "
                f"{time.perf_counter() - started:6.0f} s",
                flush=True,
            )


def train(out: str | Path, recipe: Recipe | None = None, log: bool = True) -> Path:
    """Train from scratch and write the checkpoint to `out`."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    r = recipe or Recipe()
    torch.set_num_threads(r.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(r.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = qwen2_vl_config(build_tokenizer(out, vocab_size=300, corpus=_CORPUS), r.hidden, r.layers, r.vision_width)
    model = Qwen2VLForConditionalGeneration(config)
    save_checkpoint(model, out, MIN_PIXELS, r.max_pixels)  # tokenizer and processor first: training reads them
    tokenizer, processor = AutoTokenizer.from_pretrained(out), AutoImageProcessor.from_pretrained(out)
    image_token_id = config.image_token_id
    assert image_token_id == SPECIAL_TOKENS.index("<|image_pad|>")

    model.train()
    rng = random.Random(r.seed)
    _pretrain_vision(model, r, rng, processor, log)
    model.model.visual.requires_grad_(False)  # then the language model learns to read it, the tower stays
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=r.lr, weight_decay=0.01)
    warmup = max(1, r.steps // 20)
    total = max(1, r.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * max(0.02, 1 - s / total),  # warm up, then linear decay
    )
    held_out = {
        kind: _batch(random.Random(r.seed + 1 + i), 64, tokenizer, processor, image_token_id, [question])
        for i, (kind, question) in enumerate([("color", QUESTIONS[0]), ("shape", shapes.SHAPE_QUESTIONS[0])])
    }
    started = time.perf_counter()
    for step in range(r.steps):
        loss = model(**_batch(rng, r.batch, tokenizer, processor, image_token_id)).loss
        _update(loss, opt, sched, model.parameters())
        if log and (step % 100 == 0 or step == r.steps - 1):
            acc = _accuracy(model, held_out)
            print(
                f"step {step:5d}  loss {loss.item():.4f}  answers right: color {acc['color']:.2f} "
                f"shape {acc['shape']:.2f}  {time.perf_counter() - started:6.0f} s",
                flush=True,
            )
    model.eval()
    return save_checkpoint(model, out, MIN_PIXELS, r.max_pixels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=SHIPPED, help=f"checkpoint directory (default {SHIPPED})")
    for name, default in vars(Recipe()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    print(train(out, Recipe(**args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
