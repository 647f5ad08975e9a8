"""Pixel targets and the reconstruction loss shared by every MAE-family model."""
from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major grid order."""
    b, c, h, w = imgs.shape
    g_h, g_w = h // patch, w // patch
    x = imgs.reshape(b, c, g_h, patch, g_w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, g_h * g_w, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    b, n, _ = patches.shape
    g = int(round(n ** 0.5))
    x = patches.reshape(b, g, g, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * patch, g * patch)


def pixel_targets(patches: torch.Tensor, normalize: bool) -> torch.Tensor:
    """MAE's per-patch normalised pixels: (x - mean) / sqrt(var + 1e-6)."""
    if not normalize:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + 1e-6).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the given (masked) patches only."""
    return (pred.float() - target.float()).pow(2).mean()
