"""LoMaR (Chen et al. 2022): masked reconstruction inside small local windows.

Each image gets `windows` windows of w x w patches at its own random positions
(the public code pairs image i with window i mod n, so an image can see the same
window n times; here every image draws its own). Inside each window int(ratio *
w*w) patches, as the reference counts them, are replaced by a learned mask
token; a cls token and all w*w tokens go through the encoder, whose attention
carries iRPE's relative position term (blocks.IRPEAttention, as the reference)
instead of absolute positions, and a linear head predicts the pixels of the
masked patches. Cost grows with the number of windows, not quadratically with
resolution.

Probes see what the reference's evaluation model (models_vit_rp.py) sees: the
whole image, unmasked, as one sequence with global attention; the relative
position buckets reach any distance, so the pretrained weights apply unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from timm.layers import PatchEmbed
from torch import nn

from trainers.config import TrainConfig
from trainers.mask_counts import window_masked
from trainers.models.blocks import LayerNorm, in_cpu_groups, init_patch_embed, init_weights, irpe_blocks
from trainers.models.pixels import masked_mse, patchify, pixel_targets


@dataclass
class WindowSample:
    patch_ids: torch.Tensor  # (B, n, w*w) grid ids of each window's patches, row-major
    masked: torch.Tensor  # (B, n, w*w) bool, True where the patch is masked


def window_patch_ids(corners: torch.Tensor, window: int, grid: int) -> torch.Tensor:
    """(..., 2) top-left (row, col) corners -> (..., w*w) grid ids of the window's patches."""
    offs = torch.arange(window, device=corners.device)
    rows = corners[..., 0, None, None] + offs[:, None]
    cols = corners[..., 1, None, None] + offs[None, :]
    return (rows * grid + cols).flatten(-2)


def sample_windows(batch: int, cfg: TrainConfig, generator: Optional[torch.Generator] = None,
                   device=None) -> WindowSample:
    """Random window corners per image, and a random mask of exactly
    window_masked(w, ratio) patches inside every window."""
    w, g, n = cfg.window_size, cfg.grid, cfg.windows
    gen_device = generator.device if generator is not None else device
    corners = torch.randint(0, g - w + 1, (batch, n, 2), generator=generator, device=gen_device)
    n_mask = window_masked(w, cfg.mask_ratio)
    noise = torch.rand(batch, n, w * w, generator=generator, device=gen_device)
    ranks = noise.argsort(-1).argsort(-1)
    masked = ranks < n_mask
    return WindowSample(window_patch_ids(corners, w, g).to(device), masked.to(device))


class LoMaR(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))  # no position: iRPE gives it its own bucket
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = irpe_blocks(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = LayerNorm(d)
        self.head = nn.Linear(d, cfg.patch_size ** 2 * cfg.in_chans)
        self.apply(init_weights)
        init_patch_embed(self.patch_embed.proj)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def _window_tokens(self, tokens: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
        """Gather (B, L, D) tokens into (B * n, w*w, D) window sequences."""
        b, n, a = patch_ids.shape
        idx = patch_ids.reshape(b, n * a, 1).expand(-1, -1, tokens.shape[-1])
        return torch.gather(tokens, 1, idx).reshape(b * n, a, -1)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(sequences, side*side, D) tokens of square grids (windows, or whole images)
        -> normalised encoder output of those tokens, the cls token dropped."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return in_cpu_groups(self._encode_tokens, torch.cat([cls, tokens], dim=1), self.blocks)[:, 1:]

    def _encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, imgs: torch.Tensor, generator: Optional[torch.Generator] = None,
                sample: Optional[WindowSample] = None):
        """Returns (loss, predictions of masked patches, window sample)."""
        if sample is None:
            sample = sample_windows(imgs.shape[0], self.cfg, generator, device=imgs.device)
        x = self._window_tokens(self.patch_embed(imgs), sample.patch_ids)
        masked = sample.masked.reshape(x.shape[0], -1, 1)
        x = torch.where(masked, self.mask_token.to(x.dtype), x)
        x = self._encode(x)
        pred = self.head(x[masked.squeeze(-1)])
        patches = patchify(imgs, self.cfg.patch_size)
        target_ids = sample.patch_ids[sample.masked].view(-1)
        image_of = torch.arange(imgs.shape[0], device=imgs.device)[:, None, None].expand_as(sample.masked)
        target = patches[image_of[sample.masked], target_ids]
        target = pixel_targets(target, self.cfg.norm_pix_loss)
        return masked_mse(pred, target), pred, sample

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Frozen features for probes: the whole image in one sequence (global
        attention, whatever the window size), no masking, mean of all patch tokens."""
        return self._encode(self.patch_embed(imgs)).mean(dim=1)
