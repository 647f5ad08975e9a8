"""Masking, losses and the model variants."""
import pytest
import torch

from trainers.config import TrainConfig
from trainers.models import build_model
from trainers.models.lomar import sample_windows, tiling_corners
from trainers.models.masking import random_masking
from trainers.models.pixels import patchify, unpatchify


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3), x)


def _cfg(**kw):
    return TrainConfig(**{"preset": "tiny", "img_size": 16, "patch_size": 2, "depth": 2, **kw})


@pytest.mark.parametrize("kw", [{}, {"mask_unit": 2}, {"mff": True}, {"norm_pix_loss": False}])
def test_mae_loss_only_on_masked_patches(kw):
    torch.manual_seed(0)
    cfg = _cfg(**kw)
    model = build_model(cfg).eval()
    x = torch.randn(2, 1, 16, 16)
    m = random_masking(2, cfg.grid, cfg.mask_ratio, cfg.mask_unit, torch.Generator().manual_seed(3))
    loss, pred, _ = model(x, masking=m)
    assert pred.shape == (2, cfg.seq_len - m.n_keep, cfg.patch_size ** 2)
    # the loss equals the MSE against targets of the masked patches only
    patches = patchify(x, 2)
    tgt = torch.gather(patches, 1, m.ids_masked.unsqueeze(-1).expand(-1, -1, 4))
    if cfg.norm_pix_loss:
        tgt = (tgt - tgt.mean(-1, keepdim=True)) / (tgt.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(loss, (pred - tgt).pow(2).mean(), atol=1e-6)


def test_mae_decoder_order_equals_unshuffled_decoding():
    """The decoder runs in shuffled order; it must equal decoding in grid order."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg).eval()
    x = torch.randn(2, 1, 16, 16)
    m = random_masking(2, cfg.grid, cfg.mask_ratio, 1, torch.Generator().manual_seed(5))
    with torch.no_grad():
        latent = model.encode_visible(x, m)
        pred = model.decode_masked(latent, m)
        # reference: the paper's unshuffle, then decode every token in grid order
        y = model.decoder_embed(latent)
        mask_tokens = model.mask_token.expand(2, cfg.seq_len - m.n_keep, -1)
        seq = torch.cat([y[:, 1:], mask_tokens], 1)
        seq = torch.gather(seq, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        seq = torch.cat([y[:, :1], seq], 1) + model.decoder_pos_embed
        for blk in model.decoder_blocks:
            seq = blk(seq)
        ref = model.decoder_pred(model.decoder_norm(seq))[:, 1:]
        ref = torch.gather(ref, 1, m.ids_masked.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    assert torch.allclose(pred, ref, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"mff": True}, {"model": "lomar", "img_size": 16}])
def test_cpu_image_groups_give_the_same_loss_and_gradients(kw, monkeypatch):
    """Splitting the CPU batch into image groups is a memory layout choice only."""
    from trainers.models import blocks

    def loss_and_grads(group_bytes):
        monkeypatch.setattr(blocks, "CPU_GROUP_BYTES", group_bytes)
        torch.manual_seed(0)
        model = build_model(_cfg(**kw))
        loss, _, _ = model(torch.randn(6, 1, 16, 16), torch.Generator().manual_seed(1))
        loss.backward()
        return loss, [p.grad for p in model.parameters() if p.grad is not None]

    whole, whole_grads = loss_and_grads(1 << 40)
    split, split_grads = loss_and_grads(1)  # one image (or window) per group
    assert torch.allclose(whole, split, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole_grads, split_grads))


def test_mff_weights_are_learned():
    torch.manual_seed(0)
    cfg = _cfg(mff=True, depth=4)
    assert cfg.mff_layers == (0, 3)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.fusion.weights.detach().clone()
    for _ in range(3):
        loss, _, _ = model(torch.randn(4, 1, 16, 16), torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        assert model.fusion.logits.grad.abs().sum() > 0
        opt.step()
    after = model.fusion.weights.detach()
    assert not torch.allclose(before, after)
    assert torch.isclose(after.sum(), torch.tensor(1.0))


def test_mff_default_layers_follow_the_paper():
    assert TrainConfig(preset="vit_base", mff=True).mff_layers == (0, 2, 4, 6, 8, 11)


def test_lomar_windows_inside_grid_and_per_image():
    cfg = TrainConfig(model="lomar", img_size=32, patch_size=2, window_size=5, windows=6)
    s = sample_windows(64, cfg, torch.Generator().manual_seed(0))
    assert s.patch_ids.shape == (64, 6, 25)
    assert s.patch_ids.min() >= 0 and s.patch_ids.max() < cfg.seq_len
    rows, cols = s.patch_ids // cfg.grid, s.patch_ids % cfg.grid
    # each window is a contiguous w x w block (no wrap-around past the grid edge)
    assert torch.equal(rows.amax(-1) - rows.amin(-1), torch.full((64, 6), 4))
    assert torch.equal(cols.amax(-1) - cols.amin(-1), torch.full((64, 6), 4))
    # exactly round(0.8 * 25) = 20 masked patches per window
    assert s.masked.sum(-1).eq(20).all()
    # images draw their own windows: not every image repeats image 0's corners
    assert not (s.patch_ids[:, :, 0] == s.patch_ids[:1, :, 0]).all()


def test_lomar_tiling_covers_grid():
    corners = tiling_corners(16, 7)
    covered = torch.zeros(16, 16, dtype=torch.bool)
    for r, c in corners.tolist():
        covered[r:r + 7, c:c + 7] = True
    assert covered.all()


def test_lomar_trains_and_features():
    torch.manual_seed(0)
    cfg = TrainConfig(model="lomar", preset="tiny", img_size=16, patch_size=2, window_size=4,
                      windows=2, depth=2)
    model = build_model(cfg)
    loss, pred, s = model(torch.randn(3, 1, 16, 16), torch.Generator().manual_seed(0))
    assert pred.shape == (3 * 2 * 13, 4)  # round(0.8 * 16) = 13 masked per window
    loss.backward()
    assert model.blocks[0].attn.rel_pos.relative_position_bias_table.grad.abs().sum() > 0
    assert model.features(torch.randn(3, 1, 16, 16)).shape == (3, cfg.embed_dim)


@pytest.mark.parametrize("kw,field", [
    ({"mask_ratio": 1.0}, "mask_ratio"), ({"mask_ratio": 0.0}, "mask_ratio"),
    ({"patch_size": 5}, "patch_size"), ({"patch_size": 4, "mask_unit": 3}, "mask_unit"),
    ({"model": "lomar", "window_size": 9, "patch_size": 4}, "window_size"),
    ({"preset": "vit_giant"}, "preset"), ({"dataset": "imagenet"}, "dataset"),
])
def test_impossible_configs_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kw)
