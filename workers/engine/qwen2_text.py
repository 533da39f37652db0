"""The Qwen2 decoder of Qwen2-VL and Qwen2.5-VL, as plain modules over flat token batches.

A forward takes (tokens, hidden) embeddings and (3, tokens) M-RoPE positions; whether it is a
prefill or a decode step, and where keys and values go, is the step's `Context` (context.py).
Per layer: RMSNorm -> fused QKV projection (with bias) -> M-RoPE -> attention -> o_proj ->
residual -> RMSNorm -> fused gate_up -> SiLU(gate) * up -> down -> residual. Then the final
norm. Each residual addition is done by the next norm (on CUDA one fused kernel, in place);
on CUDA the M-RoPE turn of q and k and the cache writes of k and v are one kernel too.
`logits` applies lm_head (tied to the embeddings when the config says so).

Weights come from the Hugging Face checkpoint's tensors as they ship: `load_weight` puts q, k, v
into the fused qkv_proj and gate, up into gate_up_proj, by rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from epd.workers.engine.attention import paged_decode, store_kv, triton_kernels, varlen_prefill
from epd.workers.engine.context import get_context
from torch import nn

# checkpoint projection -> (our fused projection, its shard)
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.empty(dim)), eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, residual stream): with `residual`, x is first added to it (the layer's skip connection)."""
        if x.is_cuda and (kernels := triton_kernels()) is not None:
            if residual is None:
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps), x
            return kernels.fused_add_rmsnorm(x, residual, self.weight, self.eps)  # one kernel, in place
        if residual is not None:
            x = residual = x + residual
        h = x.float()  # the mean of squares in float32; on the CPU op for op as transformers does it
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype), x


class MRoPE:
    """Rotary embeddings over three position axes (time, height, width): the rotary frequencies are split
    in `mrope_section` runs, each turned by its own axis's position. Text tokens have three equal positions."""

    def __init__(self, head_dim: int, theta: float, section: list[int], device: torch.device) -> None:
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {section} does not cover {head_dim // 2} rotary frequencies")
        self.inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        self.axis = torch.cat([torch.full((n,), i) for i, n in enumerate(section)]).to(device)  # (head_dim/2,)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, tokens) positions -> cos, sin (tokens, 1, head_dim)."""
        freqs = positions[self.axis].T.float() * self.inv_freq  # (tokens, head_dim/2): each from its axis
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (tokens, heads, head_dim) turned by the rotary angles (halves rotated, as Qwen2 does)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, layer: int, hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, heads, kv_heads, head_dim
        self.sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        self.qkv_proj = nn.Linear(hidden, sum(self.sizes), bias=True)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.scale = head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx, n = get_context(), x.shape[0]
        qkv = self.qkv_proj(x).view(n, self.heads + 2 * self.kv_heads, self.head_dim)
        cached = ctx.slot_mapping is not None  # then (tokens, kv_heads, head_dim) k and v go into the paged cache
        kernels = triton_kernels() if x.is_cuda else None
        if kernels is not None:  # the rotation and the cache writes in one kernel
            caches = (ctx.k_cache[self.layer], ctx.v_cache[self.layer], ctx.slot_mapping) if cached else ()
            kernels.rope_and_store(qkv, cos, sin, self.heads, self.kv_heads, *caches)  # q, k turned in place
            q, k = qkv[:, : self.heads], qkv[:, self.heads : self.heads + self.kv_heads]
        else:
            qk = rotate(qkv[:, : self.heads + self.kv_heads], cos, sin)  # q's and k's heads turned together
            q, k = qk[:, : self.heads], qk[:, self.heads :]
        v = qkv[:, self.heads + self.kv_heads :]
        if cached and kernels is None:
            store_kv(ctx.k_cache[self.layer], ctx.v_cache[self.layer], k, v, ctx.slot_mapping)
        if ctx.prefill:
            if ctx.slot_mapping is None:  # the prompt's KV leaves with the result (handoff, direct sink)
                k, v = k.contiguous(), v.contiguous()  # (not views that would keep the whole qkv alive)
                ctx.kept.append((k, v))
                if ctx.on_layer is not None:
                    ctx.on_layer(self.layer, k, v)
            o = varlen_prefill(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, self.scale)
        else:
            o = paged_decode(
                q, ctx.k_cache[self.layer], ctx.v_cache[self.layer], ctx.block_tables, ctx.seq_lens, self.scale
            )
        return self.o_proj(o.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.sizes = [intermediate, intermediate]
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if x.is_cuda and (kernels := triton_kernels()) is not None:
            return self.down_proj(kernels.silu_and_mul(gate_up))  # one pass over (tokens, 2 * intermediate)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, layer: int, cfg: Any, head_dim: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = Attention(layer, h, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = MLP(h, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, not yet added to `residual` (None before the first layer)."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin), residual)
        return self.mlp(h), residual


class Qwen2Text(nn.Module):
    def __init__(self, cfg: Any, device: torch.device, dtype: torch.dtype) -> None:
        """`cfg`: the checkpoint's text config. Parameters are allocated, not initialized: load them."""
        super().__init__()
        self.config = cfg
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(i, cfg, self.head_dim) for i in range(cfg.num_hidden_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = None if self.tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.to(dtype).to_empty(device=device)  # the dtype on the meta tensors: no float32 copy is ever made
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self.rope = MRoPE(self.head_dim, float(theta), list(rope.get("mrope_section", [16, 24, 24])), device)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """embeds (tokens, hidden), positions (3, tokens) -> final hidden states (tokens, hidden)."""
        cos, sin = self.rope.cos_sin(positions, embeds.dtype)
        h, residual = embeds, None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin)
        return self.norm(h, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) -> (rows, vocab) float32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    @torch.no_grad()
    def load_weight(self, name: str, tensor: torch.Tensor) -> str:
        """One checkpoint tensor, named within the language model (`layers.3.self_attn.q_proj.weight`) or
        `lm_head.weight`; returns the key it filled (a fused one names its shard: `...qkv_proj.weight#0`)."""
        if name == "lm_head.weight" and self.lm_head is None:
            return name  # tied: the embeddings serve as the head
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in FUSED:
            fused, shard = FUSED[parts[-2]]
            owner = self.get_submodule(".".join(parts[:-2]))  # the attention or MLP: it knows the shard sizes
            target = getattr(getattr(owner, fused), parts[-1])
            start = sum(owner.sizes[:shard])
            target[start : start + owner.sizes[shard]].copy_(tensor)
            return ".".join([*parts[:-2], fused, parts[-1]]) + f"#{shard}"
        try:
            target = self.get_parameter(name)
        except AttributeError:
            raise KeyError(name) from None
        target.copy_(tensor)
        return name

    def expected_keys(self) -> set[str]:
        """Every key `load_weight` must fill for the model to be whole."""
        keys = set()
        for name, _ in self.named_parameters():
            parts = name.split(".")
            fused = len(parts) > 2 and parts[-2] in ("qkv_proj", "gate_up_proj")
            shards = len(self.get_submodule(".".join(parts[:-2])).sizes) if fused else 0
            keys.update([f"{name}#{i}" for i in range(shards)] if shards else [name])
        return keys
