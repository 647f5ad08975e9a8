"""How many patches a mask ratio masks, as each reference counts them, and the
ratio that is run in fact (what a curve over the mask ratio must plot).

Without torch, so that configurations and FLOPs can be checked anywhere.
"""
from __future__ import annotations

# 1 - 0.9 is 0.0999...: without this, int() would keep 9 of 100 patches
_FLOAT_GUARD = 1e-9


def kept_patches(grid: int, mask_ratio: float) -> int:
    """Patches left visible of a grid x grid image, counted in patches whatever the
    mask unit: int(L * (1 - ratio)), as long-sequence MAE's reference code does."""
    return int(grid * grid * (1 - mask_ratio) + _FLOAT_GUARD)


def window_masked(window: int, mask_ratio: float) -> int:
    """Patches masked in each w x w LoMaR window: int(ratio * w * w), as LoMaR's code does."""
    return int(mask_ratio * window * window + _FLOAT_GUARD)


def effective_mask_ratio(model: str, grid: int, window: int, mask_ratio: float) -> float:
    if model == "lomar":
        return window_masked(window, mask_ratio) / window ** 2
    return 1 - kept_patches(grid, mask_ratio) / grid ** 2
