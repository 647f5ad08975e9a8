"""Random masking of the patch grid, with mask units of k x k adjacent patches.

Long-sequence MAE (Hu et al. 2022) decouples the mask unit from the patch: with
k > 1 k x k blocks of patches, aligned to the patch grid, are masked or kept
together; k = 1 is plain MAE. As in its reference code the number kept counts
patches, int(L * (1 - ratio)), so the unit drawn last may be kept in part and
the ratio run is the one asked for (within 1/L), whatever the unit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from trainers.mask_counts import kept_patches


@dataclass
class Masking:
    ids_shuffle: torch.Tensor  # (B, L): kept patch ids first, then masked ones
    ids_restore: torch.Tensor  # (B, L): inverse permutation of ids_shuffle
    n_keep: int  # visible patches per image

    @property
    def ids_keep(self) -> torch.Tensor:
        return self.ids_shuffle[:, : self.n_keep]

    @property
    def ids_masked(self) -> torch.Tensor:
        return self.ids_shuffle[:, self.n_keep:]

    @property
    def mask(self) -> torch.Tensor:
        """(B, L) in grid order, 1 where the patch is masked."""
        shuffled = torch.ones_like(self.ids_shuffle, dtype=torch.float32)
        shuffled[:, : self.n_keep] = 0
        return torch.gather(shuffled, 1, self.ids_restore)


def unit_of_patch(grid: int, unit: int, device=None) -> torch.Tensor:
    """(L,) index of the mask unit each patch (in row-major grid order) belongs to."""
    rows = torch.arange(grid, device=device) // unit
    per_row = grid // unit
    return (rows[:, None] * per_row + rows[None, :]).flatten()


def random_masking(batch: int, grid: int, mask_ratio: float, unit: int = 1,
                   generator: Optional[torch.Generator] = None, device=None) -> Masking:
    """Draw an independent mask per image; every patch of a unit shares its fate."""
    units = (grid // unit) ** 2
    noise = torch.rand(batch, units, generator=generator, device=generator.device if generator else device)
    noise = noise.to(device)
    # All patches of a unit get the unit's noise; a stable sort keeps each unit's
    # patches together, so the first n_keep ids are whole units but the last.
    patch_noise = noise[:, unit_of_patch(grid, unit, device=noise.device)]
    ids_shuffle = torch.argsort(patch_noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return Masking(ids_shuffle, ids_restore, kept_patches(grid, mask_ratio))
