"""Transformer stacks built from timm's ViT blocks."""
from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Callable

import torch
import torch.nn.functional as F
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


# iRPE (Wu et al. 2021) as LoMaR's reference sets it up (junchen14/LoMaR,
# vision_transformer_irpe.py: get_rpe_config(ratio=1.9, method="product",
# mode="ctx", shared_head=True, skip=1, rpe_on="k")). Its piecewise index keeps
# offsets up to alpha exact and buckets longer ones logarithmically up to beta,
# so the same table serves a 7x7 window and a whole image.
IRPE_ALPHA, IRPE_BETA, IRPE_GAMMA = 1.9, 3.8, 15.2  # 1, 2 and 8 times the ratio
IRPE_SIDE = 2 * int(IRPE_BETA) + 1  # buckets per axis: offsets -3..3
IRPE_BUCKETS = IRPE_SIDE ** 2 + 1  # row x column buckets, and one for the cls token


def irpe_index(offset: torch.Tensor) -> torch.Tensor:
    """iRPE's piecewise index of integer offsets along one axis (its Eq. 18)."""
    far = offset.abs() > IRPE_ALPHA
    ratio = offset.abs().clamp(min=1) / IRPE_ALPHA  # the clamp only keeps log finite where unused
    log_index = IRPE_ALPHA + ratio.log() / math.log(IRPE_GAMMA / IRPE_ALPHA) * (IRPE_BETA - IRPE_ALPHA)
    # the reference clips the rounded value at beta (3.8) and truncates it to an
    # integer: the same as clipping at int(beta)
    return torch.where(far, offset.sign() * log_index.round().clamp(max=int(IRPE_BETA)).long(), offset)


@lru_cache(maxsize=None)
def irpe_buckets(side: int, device: torch.device) -> torch.Tensor:
    """(1 + L, 1 + L) bucket of every (query, key) pair of a cls token followed by a
    side x side grid in row-major order: (row index + 3) * 7 + (column index + 3) of
    the offset query - key, and the last bucket for every pair with the cls token."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], -1)
    offset = pos[:, None] - pos[None]
    shift = int(IRPE_BETA)
    grid = (irpe_index(offset[..., 0]) + shift) * IRPE_SIDE + irpe_index(offset[..., 1]) + shift
    buckets = torch.full((1 + side * side, 1 + side * side), IRPE_BUCKETS - 1)
    buckets[1:, 1:] = grid
    return buckets.to(device)


class IRPEAttention(Attention):
    """timm attention with LoMaR's relative position: iRPE's contextual product
    term on the keys, logit(i, j) = q_i . k_j / sqrt(d) + q_i . r[bucket(i, j)],
    r a learned (head_dim, buckets) table shared by the heads, zero at first as in
    the reference. The input is a cls token then a square grid of tokens in
    row-major order (a LoMaR window, or a whole image)."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.rpe_table = nn.Parameter(torch.zeros(self.head_dim, IRPE_BUCKETS))

    def position_logits(self, q: torch.Tensor) -> torch.Tensor:
        """(B, H, N, head_dim) queries -> (B, H, N, N) term added to the logits."""
        side = math.isqrt(q.shape[2] - 1)
        assert side * side == q.shape[2] - 1, "expects a cls token and a square grid"
        per_bucket = q @ self.rpe_table  # every query against every bucket, then pick per pair
        index = irpe_buckets(side, q.device).expand(*q.shape[:2], -1, -1)
        return per_bucket.gather(-1, index)

    def forward(self, x, attn_mask=None, is_causal=False):
        assert attn_mask is None and not is_causal, "the relative position term is the only mask"
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_logits(q),
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim))
        return self.proj_drop(self.proj(x))


def irpe_blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, attn_layer=IRPEAttention)
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
