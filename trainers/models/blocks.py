"""Transformer stacks built from timm's ViT blocks."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from timm.layers import RelPosBias
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # MAE's norm

# glibc serves allocations above its mmap threshold (32 MiB at most) with fresh
# mmaps whose pages fault on first touch, and it trims the heap top when about
# twice the threshold lies free there. A CPU step whose activations stay well
# under that reuses its memory instead of faulting it in again on every step.
CPU_GROUP_BYTES = 16 << 20


def vit_blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
    )


class RelPosAttention(Attention):
    """timm attention with a learned relative position bias over a w x w window (LoMaR)."""

    window: int  # set by relpos_blocks: timm's Block wants a class, not a partial

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.rel_pos = RelPosBias((self.window, self.window), num_heads)

    def forward(self, x, attn_mask=None, is_causal=False):
        return super().forward(x, attn_mask=self.rel_pos.get_bias().to(x.dtype))


def relpos_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, window: int) -> nn.ModuleList:
    attn = type(f"RelPosAttention{window}", (RelPosAttention,), {"window": window})
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, attn_layer=attn)
        for _ in range(depth)
    )


def cpu_groups(x: torch.Tensor, blocks: nn.ModuleList) -> int:
    """How many groups of images a (B, N, D) input to `blocks` is split into: one
    off the CPU; on the CPU enough that the widest activation, the MLP's hidden
    layer, stays under CPU_GROUP_BYTES."""
    if x.device.type != "cpu" or not len(blocks):
        return 1
    b, n, _ = x.shape
    hidden_bytes = b * n * blocks[0].mlp.fc1.out_features * x.element_size()
    return min(b, math.ceil(hidden_bytes / CPU_GROUP_BYTES))


def in_cpu_groups(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  blocks: nn.ModuleList) -> torch.Tensor:
    """fn(x) for an fn that works image by image and runs `blocks`, computed over
    cpu_groups(x, blocks) groups of images one after the other and concatenated:
    the same result up to float rounding, with smaller activations."""
    groups = cpu_groups(x, blocks)
    return fn(x) if groups == 1 else torch.cat([fn(g) for g in x.chunk(groups)])


def init_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears, zero biases, unit layer norms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_patch_embed(proj: nn.Conv2d) -> None:
    """Initialise the patch projection like a linear layer (MAE)."""
    w = proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(proj.bias)
