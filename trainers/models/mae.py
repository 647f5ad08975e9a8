"""Masked autoencoder (He et al. 2021), with long-sequence mask units (Hu et al.
2022) and multi-level feature fusion (MFF, Liu et al. 2023) as switches."""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from torch import nn

from trainers.config import TrainConfig
from trainers.models.blocks import (LayerNorm, in_cpu_groups, init_patch_embed, init_weights,
                                    vit_blocks)
from trainers.models.masking import Masking, random_masking
from trainers.models.pixels import masked_mse, patchify, pixel_targets


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, (1, 1 + L, dim) with a zero row for the cls token."""
    table = build_sincos2d_pos_embed([grid, grid], dim)
    return torch.cat([torch.zeros(1, dim), table]).unsqueeze(0)


class FeatureFusion(nn.Module):
    """MFF: softmax-weighted average of chosen encoder layers, each earlier layer
    through its own linear projection, the last one as it is (mmpretrain's
    MFFViT). It feeds the decoder only: probes read the plain encoder."""

    def __init__(self, dim: int, layers: tuple[int, ...]):
        super().__init__()
        self.layers = layers
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in layers[:-1])
        self.logits = nn.Parameter(torch.zeros(len(layers)))

    @property
    def weights(self) -> torch.Tensor:
        return self.logits.softmax(0)

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        feats = [p(outputs[i]) for p, i in zip(self.proj, self.layers[:-1])]
        feats.append(outputs[self.layers[-1]])
        w = self.weights
        return sum(wi * f for wi, f in zip(w, feats))


class MAE(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim
        self.patch = cfg.patch_size
        self.grid = cfg.grid
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, d), persistent=False)
        self.blocks = vit_blocks(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.fusion = FeatureFusion(d, cfg.mff_layers) if cfg.mff else None
        self.norm = LayerNorm(d)

        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(self.grid, dd), persistent=False)
        self.decoder_blocks = vit_blocks(dd, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio)
        self.decoder_norm = LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, cfg.patch_size ** 2 * cfg.in_chans)

        self.apply(init_weights)
        init_patch_embed(self.patch_embed.proj)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- encoder
    def _encode(self, tokens: torch.Tensor, fuse: bool = True) -> torch.Tensor:
        """Encoder output of cls + tokens, normalised; with MFF and `fuse`, the fused
        layers (what the decoder reads) instead of the last block's output."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        fusion = self.fusion if fuse else None
        return in_cpu_groups(partial(self._encode_tokens, fusion=fusion),
                             torch.cat([cls, tokens], dim=1), self.blocks)

    def _encode_tokens(self, x: torch.Tensor, fusion: Optional[FeatureFusion]) -> torch.Tensor:
        outputs = []
        for blk in self.blocks:
            x = blk(x)
            if fusion is not None:  # layer outputs are kept only when they are fused
                outputs.append(x)
        return self.norm(x if fusion is None else fusion(outputs))

    def encode_visible(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Encoder on the visible patches only (plus cls): (B, 1 + n_keep, D)."""
        tokens = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        keep = masking.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return self._encode(torch.gather(tokens, 1, keep))

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder features for probes: mean of all patch tokens, no masking.
        With MFF too the plain encoder (last block, then the norm): MFF's reference
        evaluates a plain ViT on the pretrained weights, the fusion left out."""
        tokens = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        return self._encode(tokens, fuse=False)[:, 1:].mean(dim=1)

    # -- decoder
    def decode_masked(self, latent: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Pixel predictions for the masked patches, in masking.ids_masked order.

        The decoder has no relative positions, so running it on the shuffled
        sequence (visible tokens, then mask tokens) with the position embedding
        gathered into that order is the paper's unshuffle-then-decode exactly; it
        saves two gathers of the token tensor and predicts only what the loss uses.
        """
        x = self.decoder_embed(latent)
        b, n_vis, dd = x.shape
        n_mask = masking.ids_shuffle.shape[1] - (n_vis - 1)
        x = torch.cat([x, self.mask_token.expand(b, n_mask, -1)], dim=1)
        order = masking.ids_shuffle.unsqueeze(-1).expand(-1, -1, dd)
        pos = torch.gather(self.decoder_pos_embed[:, 1:].expand(b, -1, -1), 1, order)
        x = x + torch.cat([self.decoder_pos_embed[:, :1].expand(b, -1, -1), pos], dim=1)
        return in_cpu_groups(partial(self._decode_tokens, n_vis=n_vis), x, self.decoder_blocks)

    def _decode_tokens(self, x: torch.Tensor, n_vis: int) -> torch.Tensor:
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x[:, n_vis:]))

    def forward(self, imgs: torch.Tensor, generator: Optional[torch.Generator] = None,
                masking: Optional[Masking] = None):
        """Returns (loss, predictions of masked patches, masking)."""
        if masking is None:
            masking = random_masking(imgs.shape[0], self.grid, self.cfg.mask_ratio,
                                     self.cfg.mask_unit, generator, device=imgs.device)
        pred = self.decode_masked(self.encode_visible(imgs, masking), masking)
        patches = patchify(imgs, self.patch)
        idx = masking.ids_masked.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        target = pixel_targets(torch.gather(patches, 1, idx), self.cfg.norm_pix_loss)
        return masked_mse(pred, target), pred, masking
