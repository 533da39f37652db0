"""The Qwen2-VL and Qwen2.5-VL vision towers as the project's own modules.

Input: the image processor's flat patches of every image of a pack, (patches, C*T*P*P), and each image's
grid (t, h, w) in patches. Output: the merged embeddings of every image in image order,
(patches / merge^2, out_hidden). The arithmetic is transformers' (same parameters, same op order), but:

- attention is ONE varlen call per layer over the whole pack (`cu_seqlens` per image, or per window for
  Qwen2.5-VL's windowed blocks): per-segment SDPA on the CPU, one non-causal Triton launch on CUDA;
- what depends only on an image's grid (rotary cos/sin, Qwen2.5-VL's window order and window lengths) is
  computed once per grid and kept in a small LRU, then concatenated for the pack.

Parameters are named as the checkpoint's `visual.*` tensors (QKV fused as shipped), so loading is a
name lookup; Qwen2.5-VL's gate and up projections are fused into one matmul at load time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from epd.workers.engine.attention import varlen_attention
from torch import nn

GRID_CACHE = 64  # distinct image grids whose rotary tables and window orders are kept


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_pytorch_tanh"):
        return (lambda x: F.gelu(x, approximate="tanh")) if name == "gelu_pytorch_tanh" else F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"vision activation {name!r} is not supported")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).unbind(1)  # each (n, heads, head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.head_dim**-0.5, causal=False)
        return self.proj(out.reshape(n, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary turn over the whole head dim in float32 (cos/sin (n, head_dim)), as the towers do it."""
    xf = x.float()
    half = xf.shape[-1] // 2
    turned = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None] + turned * sin[:, None]).to(x.dtype)


class Mlp(nn.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), gate and up as one (2 * hidden, dim) matmul."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.hidden, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: nn.Module, rms: bool) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = RMSNorm(dim) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    """Norm, then each merge x merge square of neighbouring patches (adjacent rows) through a 2-layer MLP."""

    def __init__(self, out_dim: int, dim: int, merge: int, rms: bool) -> None:
        super().__init__()
        self.width = dim * merge * merge
        self.ln_q = RMSNorm(dim) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


@dataclass
class GridPlan:
    """What a pack of image grids needs, all on the tower's device.

    `order`: Qwen2.5-VL's window order of the merged tokens (None: image order); `cos`/`sin` (patches, head_dim)
    in the order the blocks see the patches; `cu_full`/`cu_window` int32 segment bounds with their longest."""

    cos: torch.Tensor
    sin: torch.Tensor
    cu_full: torch.Tensor
    max_full: int
    order: torch.Tensor | None
    restore: torch.Tensor | None
    cu_window: torch.Tensor | None
    max_window: int


class VisionTower(nn.Module):
    """Qwen2-VL's (`windowed=False`: LayerNorm, quick-GELU MLP, full attention per image) or Qwen2.5-VL's
    (RMSNorm, SwiGLU MLP, attention within windows except at `fullatt_block_indexes`) vision tower."""

    def __init__(self, cfg: Any, windowed: bool) -> None:
        super().__init__()
        self.windowed = windowed
        dim = cfg.hidden_size if windowed else cfg.embed_dim
        out_dim = cfg.out_hidden_size if windowed else cfg.hidden_size
        self.dim, self.heads = dim, cfg.num_heads
        self.head_dim = dim // cfg.num_heads
        self.merge, self.patch = cfg.spatial_merge_size, cfg.patch_size
        self.in_channels, self.temporal = cfg.in_channels, cfg.temporal_patch_size
        kernel = (self.temporal, self.patch, self.patch)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(self.in_channels, dim, kernel_size=kernel, stride=kernel, bias=False)
        blocks = []
        for _ in range(cfg.depth):
            if windowed:
                mlp: nn.Module = GatedMlp(dim, cfg.intermediate_size, cfg.hidden_act)
            else:
                mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.hidden_act)
            blocks.append(Block(dim, cfg.num_heads, mlp, rms=windowed))
        self.blocks = nn.ModuleList(blocks)
        self.merger = Merger(out_dim, dim, self.merge, rms=windowed)
        self.full_blocks = set(cfg.fullatt_block_indexes) if windowed else set(range(cfg.depth))
        self.window = cfg.window_size // self.merge // self.patch if windowed else 0  # merged tokens per side
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        half = self.head_dim // 2  # rows and columns each get head_dim / 4 frequencies
        # float32 on the CPU, not a buffer: tables are built per grid on the CPU, then copied with the plan
        self.inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float, device="cpu") / half)
        self._grids: OrderedDict[tuple[int, int, int], tuple] = OrderedDict()

    # -- loading ---------------------------------------------------------------------------------------------
    def load_weight(self, name: str, tensor: torch.Tensor) -> str:
        """One checkpoint tensor, named relative to `visual.`; returns its name (as `expected_keys` lists it).
        Qwen2.5-VL's separate gate/up projections go into halves of the fused one."""
        params = self._params if hasattr(self, "_params") else dict(self.named_parameters())
        self._params = params
        for part, half in (("gate_proj", 0), ("up_proj", 1)):
            if f".mlp.{part}." in name:
                fused = name.replace(part, "gate_up_proj")
                p = params[fused]
                rows = p.shape[0] // 2
                with torch.no_grad():
                    p[half * rows : (half + 1) * rows].copy_(tensor)
                return name
        if name not in params:
            raise KeyError(name)
        with torch.no_grad():
            params[name].copy_(tensor)
        return name

    def expected_keys(self) -> set[str]:
        keys = set()
        for name, _ in self.named_parameters():
            if ".gate_up_proj." in name:
                keys |= {name.replace("gate_up_proj", "gate_proj"), name.replace("gate_up_proj", "up_proj")}
            else:
                keys.add(name)
        return keys

    # -- per-grid work, cached -------------------------------------------------------------------------------
    def _grid(self, thw: tuple[int, int, int]) -> tuple:
        """One image grid's (cos, sin, window order, window lengths) on the CPU, image-local, cos/sin (patches,
        head_dim) already in window order; LRU-cached."""
        hit = self._grids.get(thw)
        if hit is not None:
            self._grids.move_to_end(thw)
            return hit
        t, h, w = thw
        m = self.merge
        # patch (row, col) in merge-block-major order: the processor emits each m x m square's patches together
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m).transpose(1, 2).reshape(-1)
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m).transpose(1, 2).reshape(-1)
        freqs = torch.stack([rows, cols], -1).repeat(t, 1)[..., None].float() * self.inv_freq  # (n, 2, d/4)
        angles = freqs.flatten(1)  # (n, d/2): h angles then w angles
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin, order, lengths = angles.cos(), angles.sin(), None, None
        if self.windowed:
            order, lengths = self._windows(t, h // m, w // m)
            # the patch rows in the order the blocks see them: each merged token's m*m patches move with it
            idx = (order[:, None] * (m * m) + torch.arange(m * m)).reshape(-1)
            cos, sin = cos[idx], sin[idx]
        hit = (cos, sin, order, lengths)
        self._grids[thw] = hit
        if len(self._grids) > GRID_CACHE:
            self._grids.popitem(last=False)
        return hit

    def _windows(self, t: int, gh: int, gw: int) -> tuple[torch.Tensor, list[int]]:
        """Merged tokens of one image (t, gh, gw) in window order, windows of `window` x `window` read left to
        right, top to bottom (the ragged ones at the right and bottom edges smaller); each window's token count."""
        ws = self.window
        nh, nw = -(-gh // ws), -(-gw // ws)
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        padded = F.pad(index, (0, nw * ws - gw, 0, nh * ws - gh), value=-1)
        padded = padded.view(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
        keep = padded >= 0
        return padded[keep], [int(c) for c in keep.sum(1).tolist() if c]

    def plan(self, grids: list[list[int]]) -> GridPlan:
        """The pack's rotary tables and segment bounds (one host-to-device copy each)."""
        unit = self.merge * self.merge
        dev = self.merger.mlp[0].weight.device
        cos, sin, orders, full, windows = [], [], [], [0], [0]
        merged_before = 0
        for thw in grids:
            c, s, order, lengths = self._grid(tuple(int(x) for x in thw))
            t, h, w = thw
            for _ in range(t):  # each frame attends within itself
                full.append(full[-1] + h * w)
            if order is not None:
                orders.append(order + merged_before)
                for n in lengths:
                    windows.append(windows[-1] + n * unit)
            merged_before += t * h * w // unit
            cos.append(c)
            sin.append(s)
        cu_full = torch.tensor(full, dtype=torch.int32)
        max_full = int((cu_full[1:] - cu_full[:-1]).max()) if len(full) > 1 else 0
        if not self.windowed:
            return GridPlan(
                torch.cat(cos).to(dev), torch.cat(sin).to(dev), cu_full.to(dev), max_full, None, None, None, 0
            )
        order = torch.cat(orders)
        cu_window = torch.tensor(windows, dtype=torch.int32)
        max_window = int((cu_window[1:] - cu_window[:-1]).max()) if len(windows) > 1 else 0
        return GridPlan(
            torch.cat(cos).to(dev),
            torch.cat(sin).to(dev),
            cu_full.to(dev),
            max_full,
            order.to(dev),
            torch.argsort(order).to(dev),
            cu_window.to(dev),
            max_window,
        )

    # -- the forward -----------------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor, grids: list[list[int]]) -> torch.Tensor:
        """pixels (patches, C*T*P*P) of every image -> merged embeddings (patches / merge^2, out_dim), image order."""
        plan = self.plan(grids)
        proj = self.patch_embed.proj
        x = pixels.view(-1, self.in_channels, self.temporal, self.patch, self.patch).to(proj.weight.dtype)
        # the conv's stride equals its kernel: one matmul per patch, as a linear layer
        x = F.linear(x.flatten(1), proj.weight.flatten(1))  # (patches, dim)
        unit = self.merge * self.merge
        if plan.order is not None:
            n = x.shape[0]
            x = x.view(n // unit, unit, -1)[plan.order].view(n, -1)
        cos, sin = plan.cos, plan.sin
        for i, block in enumerate(self.blocks):
            if i in self.full_blocks:
                x = block(x, cos, sin, plan.cu_full, plan.max_full)
            else:
                x = block(x, cos, sin, plan.cu_window, plan.max_window)
        merged = self.merger(x)
        return merged if plan.restore is None else merged[plan.restore]


def empty_tower(cfg: Any, device: torch.device, dtype: torch.dtype) -> VisionTower:
    """The tower of a checkpoint's config (windowed when its vision config has `fullatt_block_indexes`), its
    parameters allocated on `device` and not initialised: loading fills every one (`expected_keys`)."""
    vc = cfg.vision_config
    with torch.device("meta"):
        tower = VisionTower(vc, windowed=hasattr(vc, "fullatt_block_indexes"))
    return tower.to_empty(device=device).to(dtype).eval()


def tower_from_module(module: nn.Module, cfg: Any, device: torch.device, dtype: torch.dtype) -> VisionTower:
    """Our tower with the weights of transformers' vision module built in memory (benchmarks, tests)."""
    tower = empty_tower(cfg, device, dtype)
    for name, p in module.named_parameters():
        tower.load_weight(name, p)
    return tower
