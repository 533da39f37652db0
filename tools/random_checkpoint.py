"""A random-weight checkpoint in Qwen2.5-VL-7B-Instruct's shape, laid out as the published one on disk.

For GPU benchmarks of the whole system: `epd up --model DIR` loads it through the same path as the real
checkpoint. Nothing is downloaded, so everything a real directory holds is made here:

- `config.json` with the published shapes and Qwen's token ids (the image pad is 151655, and so on);
- a word-level tokenizer of the model's 152,064 ids: ids below 151,643 are the words `t0`, `t1`, ...,
  Qwen's special tokens sit at their real ids. Every id decodes to text, so a stream of random tokens
  is a stream of visible words, and a prompt of N space-separated words is N tokens;
- the image processor with Qwen's pixel bounds, and the chat template;
- bf16 safetensors shards (about 16.6 GB) named as the published files name them (`model.layers.*`,
  `visual.*`, `lm_head.weight`), drawn on the GPU when there is one: matrices N(0, 0.02), norms 1, biases 0.

`--small` keeps the vocabulary and ids and shrinks every width and depth (about 80 MB, the vocabulary's
two matrices nearly all of it), for the CPU and tests.

    python -m epd.tools.random_checkpoint /tmp/qwen2.5-vl-7b-random [--small]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from epd.tools.tiny_model import CHAT_TEMPLATE

VOCAB = 152064
WORDS = 151643  # ids below this are ordinary tokens in Qwen2's vocabulary
SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # Qwen2.5-VL's processor bounds


def qwen2_5_vl_7b_config(layers: int = 28, small: bool = False) -> Any:
    """Qwen2.5-VL-7B-Instruct's shape (its published config.json), with `layers` text layers; `small`: the same
    vocabulary, ids and rotary split at about 80 MB."""
    from transformers import Qwen2_5_VLConfig

    text = {"hidden_size": 3584, "intermediate_size": 18944, "heads": 28, "kv_heads": 4}
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16}
    fullatt = [7, 15, 23, 31]
    if small:  # head dim 128 kept, so M-RoPE's [16, 24, 24] split still fits
        text = {"hidden_size": 128, "intermediate_size": 256, "heads": 1, "kv_heads": 1}
        vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2}
        layers, fullatt = min(layers, 2), [1]
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": text["hidden_size"],
            "intermediate_size": text["intermediate_size"],
            "num_hidden_layers": layers,
            "num_attention_heads": text["heads"],
            "num_key_value_heads": text["kv_heads"],
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
            "tie_word_embeddings": False,
            "bos_token_id": SPECIAL_IDS["<|endoftext|>"],
            "eos_token_id": SPECIAL_IDS["<|im_end|>"],
        },
        vision_config={
            **vision,
            "out_hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": fullatt,
        },
        image_token_id=SPECIAL_IDS["<|image_pad|>"],
        video_token_id=SPECIAL_IDS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_IDS["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tokenizer(out: Path) -> None:
    """A word-level tokenizer over the whole vocabulary: `t<id>` words split on whitespace, Qwen's specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    by_id = {i: name for name, i in SPECIAL_IDS.items()}
    vocab = {by_id.get(i, f"t{i}" if i < WORDS else f"<|extra_{i}|>"): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_IDS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="t0"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def published_name(key: str) -> str:
    """transformers 5's parameter name as the published checkpoint spells it."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def write_weights(config: Any, out: Path, shard_bytes: int, std: float = 0.02, seed: int = 0) -> int:
    """Random bf16 weights for every tensor transformers' model has, in shards with an index; returns bytes.
    Matrices are N(0, `std`): the published init's 0.02 keeps a 28-layer stack finite in bf16."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        state = Qwen2_5_VLForConditionalGeneration(config).state_dict()
    shapes = {published_name(k): v.shape for k, v in state.items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=torch.bfloat16, device=device)
            if name.endswith(".bias"):
                t.zero_()
            elif t.ndim == 1:  # norm scales
                t.fill_(1.0)
            else:
                t.normal_(0.0, std, generator=gen)
            tensors[name] = t.cpu()
            weight_map[name] = file
            total += 2 * t.numel()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def build(out: str | Path, small: bool = False, layers: int = 28, shard_gb: float = 4.0, std: float = 0.02) -> Path:
    """Write the whole checkpoint directory to `out` and return it. A larger `std` spreads the logits apart,
    so that greedy choices do not hang on rounding (the oracle tests' small checkpoints)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = qwen2_5_vl_7b_config(layers, small)
    # as the published config names it: engines pick the model class from it (without it, vLLM takes the
    # checkpoint for an embedding model and serves no chat completions)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(out)
    eos = [SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]]
    generation = {"bos_token_id": SPECIAL_IDS["<|endoftext|>"], "pad_token_id": SPECIAL_IDS["<|endoftext|>"]}
    (out / "generation_config.json").write_text(json.dumps(generation | {"eos_token_id": eos}, indent=1))
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    build_tokenizer(out)
    write_weights(config, out, int(shard_gb * 2**30), std)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--small", action="store_true", help="the same vocabulary and ids at about 80 MB")
    p.add_argument("--layers", type=int, default=28, help="text layers")
    args = p.parse_args(argv)
    started = time.perf_counter()
    out = build(args.out, args.small, args.layers)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {size / 2**30:.2f} GiB of weights in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
