"""Build a tiny random-weight Qwen2-VL checkpoint, laid out as a real one on disk.

The checkpoint has everything a Hugging Face model directory holds: config,
safetensors weights, a byte-level BPE tokenizer with Qwen's special tokens, the
image processor's settings and a chat template. Tests and `epd up` load it
through the same code path a downloaded checkpoint takes; nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A Qwen-style ChatML template: strings or typed parts, images as a vision block.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "What color is the shape? The shape is red. It is a green circle. A blue square. "
    "A yellow triangle on a white background. Describe the image. What shape is it? "
    "Hello, how are you today? I am a small model that answers questions about images. "
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}<>-_=+/\\ "
)


def build_tokenizer(out: Path, vocab_size: int = 400, corpus: str = _CORPUS) -> int:
    """Train a byte-level BPE on a fixed corpus (deterministic) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def qwen2_vl_config(vocab: int, hidden: int, layers: int, vision_width: int | None = None) -> Any:
    """A small Qwen2-VL configuration: 4 attention heads, GQA 2, M-RoPE, 14-pixel patches merged 2x2.

    `hidden` must be a multiple of 16; the vision tower is `layers` deep and `vision_width` wide.
    """
    from transformers import Qwen2VLConfig

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}  # special tokens are added first
    half = hidden // 4 // 2  # half the head dim (4 heads): the rotary dims M-RoPE splits over t, h, w
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    return Qwen2VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
            "tie_word_embeddings": False,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": layers,
            "embed_dim": vision_width or hidden // 2,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def qwen2_5_vl_config(vocab: int, hidden: int, layers: int, vision_width: int | None = None) -> Any:
    """Qwen2.5-VL at the same small size: the same text model; a vision tower with windowed attention
    (windows of 2x2 merged tokens, the last block attending to the whole image) and a SwiGLU MLP."""
    from transformers import Qwen2_5_VLConfig

    base = qwen2_vl_config(vocab, hidden, layers, vision_width).to_dict()
    width = vision_width or hidden // 2
    return Qwen2_5_VLConfig(
        text_config={k: base["text_config"][k] for k in (*_TEXT_KEYS, "rope_parameters")},
        vision_config={
            "depth": layers,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [layers - 1],
        },
        **{k: base[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")},
        tie_word_embeddings=False,
    )


_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
)
CONFIGS = {"qwen2_vl": qwen2_vl_config, "qwen2_5_vl": qwen2_5_vl_config}


def save_checkpoint(model: Any, out: Path, min_pixels: int, max_pixels: int) -> Path:
    """Weights, generation config, image processor and chat template, beside the tokenizer already in `out`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return out


def build_tiny_qwen2_vl(
    out: str | Path,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    family: str = "qwen2_vl",
    vision_width: int | None = None,
) -> Path:
    """Write a random-weight checkpoint of `family` (qwen2_vl, qwen2_5_vl) to `out`: a few MB at the default size.

    `hidden` and `layers` make a bigger one (benchmarks): `hidden` must be a multiple of 16.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[family](build_tokenizer(out), hidden, layers, vision_width)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():  # larger weights than the init's: logits far apart, so argmax is stable
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    return save_checkpoint(model, out, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)


def reshard(src: Path, dst: Path, max_shard_size: str) -> Path:
    """`src` again at `dst` with its weights in shards of at most `max_shard_size` and an index,
    as large checkpoints come; the tokenizer, processor and template files are copied."""
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(src).save_pretrained(dst, max_shard_size=max_shard_size)
    for f in Path(src).iterdir():
        if not f.name.startswith("model") and not (dst / f.name).exists():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst
