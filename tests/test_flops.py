"""Analytic FLOPs against torch's FlopCounterMode, for every variant."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainers.config import TrainConfig
from trainers.flops import train_flops_per_image
from trainers.models import build_model

VARIANTS = {
    "mae": dict(preset="tiny"),
    "mae_long_seq_unit2": dict(preset="tiny", patch_size=2, mask_unit=2),
    "mae_mff": dict(preset="cpu_small", mff=True),
    "lomar": dict(model="lomar", preset="tiny", patch_size=2, window_size=5, windows=3),
    "lomar_7x7": dict(model="lomar", preset="tiny", img_size=28, patch_size=2, window_size=7, windows=4),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_analytic_flops_match_flop_counter(name):
    cfg = TrainConfig(**VARIANTS[name])
    model = build_model(cfg)
    x = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size)
    # FlopCounterMode has no formula for CPU's fused attention kernel, so count
    # attention through the math backend (the same products, unfused).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _, _ = model(x, torch.Generator().manual_seed(0))
        loss.backward()
    measured = counter.get_total_flops() / 4
    assert train_flops_per_image(cfg) == pytest.approx(measured, rel=0.05)


def test_encoder_sees_only_visible_tokens():
    """Masking more must cost less: compute is per configuration, not 6*N*D."""
    lo = train_flops_per_image(TrainConfig(preset="vit_base", img_size=224, patch_size=16, mask_ratio=0.5))
    hi = train_flops_per_image(TrainConfig(preset="vit_base", img_size=224, patch_size=16, mask_ratio=0.9))
    assert hi < 0.7 * lo


def test_lomar_flops_count_the_irpe_table_the_model_has():
    """flops.py repeats the iRPE bucket count to stay free of torch: keep them equal."""
    from trainers import flops
    from trainers.models.blocks import IRPE_BUCKETS
    assert flops.IRPE_BUCKETS == IRPE_BUCKETS
