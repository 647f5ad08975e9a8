"""MAE masking with mask units: what is kept, and the ratio that is run in fact."""
import pytest
import torch

from orchestrator.planning import make_plan
from orchestrator.study import StudyError
from trainers.config import TrainConfig
from trainers.mask_counts import effective_mask_ratio, kept_patches
from trainers.models.masking import random_masking


@pytest.mark.parametrize("grid,ratio,unit", [(16, 0.75, 1), (16, 0.75, 2), (8, 0.6, 4), (14, 0.75, 7),
                                             (8, 0.7, 2), (10, 0.9, 2)])
def test_keep_count_is_in_patches_and_units_are_masked_together(grid, ratio, unit):
    m = random_masking(6, grid, ratio, unit, torch.Generator().manual_seed(0))
    mask = m.mask.view(6, grid, grid)
    # the long-sequence MAE reference: int(L * (1 - r)) patches, whatever the unit
    assert m.n_keep == kept_patches(grid, ratio) == round(grid * grid * (1 - ratio) - 0.5 + 1e-6)
    assert (mask == 0).sum(dim=(1, 2)).eq(m.n_keep).all()
    # aligned unit blocks are all masked or all visible, but for at most one boundary unit
    blocks = mask.view(6, grid // unit, unit, grid // unit, unit).permute(0, 1, 3, 2, 4).flatten(3)
    mixed = (blocks.min(-1).values != blocks.max(-1).values).sum(dim=(1, 2))
    assert (mixed <= 1).all()


def test_the_ratio_run_is_the_ratio_asked_for_with_mask_units():
    """Whole-unit rounding ran 0.8125 for 0.75 with 2x2 units on an 8x8 grid (3 + ...);
    now the effective ratio is within 1/L of the request, for every unit."""
    for unit in (1, 2, 4):
        cfg = TrainConfig(img_size=32, patch_size=4, mask_ratio=0.7, mask_unit=unit)
        eff = cfg.resolved()["effective_mask_ratio"]
        assert eff == 1 - 19 / 64  # int(64 * 0.3) = 19 kept
        assert abs(eff - 0.7) < 1 / 64
    # float error no longer drops a patch: 10 of 100 are kept at r = 0.9
    assert kept_patches(10, 0.9) == 10 and effective_mask_ratio("mae", 10, 7, 0.9) == pytest.approx(0.9)
    # LoMaR: the reference masks int(r * w * w) of each window
    assert TrainConfig(model="lomar", img_size=28, patch_size=2, window_size=7,
                       mask_ratio=0.8).resolved()["effective_mask_ratio"] == 39 / 49


@pytest.mark.parametrize("kw", [dict(img_size=32, patch_size=8, mask_ratio=0.95),  # 16 patches: 0.8 kept
                                dict(img_size=32, patch_size=8, mask_ratio=0.95, mask_unit=2),
                                # LoMaR's int(r * w * w) masks none of a 3x3 window at r = 0.1
                                dict(model="lomar", img_size=32, patch_size=4, window_size=3, mask_ratio=0.1)])
def test_a_configuration_that_keeps_or_masks_no_patch_is_refused(kw):
    with pytest.raises(ValueError, match="mask_ratio: .* no visible patch|none would be masked"):
        TrainConfig(**kw)


def test_a_tuned_mask_ratio_that_can_keep_no_patch_is_refused_before_anything_runs(tmp_path):
    from orchestrator.study import Budget, Objective, Profile, Study, Uniform

    study = Study(name="s", question="q", objective=Objective(metric="loss", mode="min"),
                  profiles={"local": Profile(axes={"mask_unit": [1, 2]}, budget=Budget(steps=2),
                                             fixed={"img_size": 32, "patch_size": 8})},
                  tune={"mask_ratio": Uniform(low=0.5, high=0.97)})
    with pytest.raises(StudyError, match="cell mask_unit=1: .*mask_ratio"):
        make_plan(study, "local", "s.py")


def test_ids_restore_inverts_shuffle():
    m = random_masking(4, 8, 0.75, 1, torch.Generator().manual_seed(1))
    ar = torch.arange(64).expand(4, -1)
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), ar)
    # kept ids are exactly the positions marked visible
    for b in range(4):
        assert set(m.ids_keep[b].tolist()) == set((m.mask[b] == 0).nonzero().flatten().tolist())
