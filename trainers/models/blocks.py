"""Transformer stacks built from timm's ViT blocks."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import RelPosBias
from timm.layers.attention import Attention as TimmAttention
from timm.models.vision_transformer import Block
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # MAE's norm


class _SplitHeads(torch.autograd.Function):
    """(B, N, 3 * H * d) qkv projection -> q, k, v views of shape (B, H, N, d).

    The values are timm's reshape/permute/unbind. The backward writes the three
    gradients into one buffer laid out like the projection; autograd's own
    backward of unbind + permute stacks them and then copies the stack again.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int):
        b, n, c = qkv.shape
        return qkv.view(b, n, 3, heads, c // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        b, h, n, d = grads[0].shape
        out = grads[0].new_empty(b, n, 3, h, d)
        for i, g in enumerate(grads):
            out[:, :, i].copy_(g.transpose(1, 2))
        return out.view(b, n, 3 * h * d), None


class Attention(TimmAttention):
    """timm's attention (same parameters and math) with a cheaper qkv split."""

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, _ = x.shape
        q, k, v = _SplitHeads.apply(self.qkv(x), self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim))


def vit_blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, attn_layer=Attention)
        for _ in range(depth)
    )


class RelPosAttention(Attention):
    """Attention with a learned relative position bias over a w x w window (LoMaR)."""

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
