"""Masking, losses and the model variants."""
import math

import pytest
import torch

from trainers.config import TrainConfig
from trainers.models import build_model
from trainers.models.blocks import IRPEAttention, irpe_buckets
from trainers.models.lomar import sample_windows
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


@pytest.mark.parametrize("depth,layers", [
    (12, (0, 2, 4, 6, 8, 11)), (24, tuple(range(0, 22, 2)) + (23,)), (6, (0, 2, 5)), (4, (0, 3)),
])
def test_mff_default_layers_follow_the_reference(depth, layers):
    """mmpretrain's MFF configs fuse out_indices=[0, 2, 4, 6, 8, 11] of ViT-B's 12
    blocks: every other block from the first, and the last; other depths alike."""
    assert TrainConfig(preset="vit_base", depth=depth, mff=True).mff_layers == layers


def test_mff_probes_read_the_plain_encoder():
    """Fusion feeds the decoder only: features() are the last block's output, normed,
    averaged over patches; changing the fusion moves the loss, not the features."""
    torch.manual_seed(0)
    model = build_model(_cfg(mff=True, depth=4)).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        feats, loss = model.features(x), model(x, torch.Generator().manual_seed(0))[0]
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1)
        seq = torch.cat([cls, model.patch_embed(x) + model.pos_embed[:, 1:]], dim=1)
        for blk in model.blocks:
            seq = blk(seq)
        assert torch.allclose(feats, model.norm(seq)[:, 1:].mean(dim=1), atol=1e-6)
        model.fusion.logits.copy_(torch.tensor([2.0, -2.0]))
        model.fusion.proj[0].weight.mul_(3)
        assert torch.equal(model.features(x), feats)
        assert not torch.isclose(model(x, torch.Generator().manual_seed(0))[0], loss)


def test_lomar_windows_inside_grid_and_per_image():
    cfg = TrainConfig(model="lomar", img_size=32, patch_size=2, window_size=5, windows=6)
    s = sample_windows(64, cfg, torch.Generator().manual_seed(0))
    assert s.patch_ids.shape == (64, 6, 25)
    assert s.patch_ids.min() >= 0 and s.patch_ids.max() < cfg.seq_len
    rows, cols = s.patch_ids // cfg.grid, s.patch_ids % cfg.grid
    # each window is a contiguous w x w block (no wrap-around past the grid edge)
    assert torch.equal(rows.amax(-1) - rows.amin(-1), torch.full((64, 6), 4))
    assert torch.equal(cols.amax(-1) - cols.amin(-1), torch.full((64, 6), 4))
    # exactly int(25 * 0.8) = 20 masked patches per window
    assert s.masked.sum(-1).eq(20).all()
    # images draw their own windows: not every image repeats image 0's corners
    assert not (s.patch_ids[:, :, 0] == s.patch_ids[:1, :, 0]).all()


def test_lomar_trains_and_features():
    torch.manual_seed(0)
    cfg = TrainConfig(model="lomar", preset="tiny", img_size=16, patch_size=2, window_size=4,
                      windows=2, depth=2)
    model = build_model(cfg)
    loss, pred, s = model(torch.randn(3, 1, 16, 16), torch.Generator().manual_seed(0))
    # the reference masks int(w * w * ratio) = int(12.8) = 12 per window (rounding gave 13)
    assert pred.shape == (3 * 2 * 12, 4)
    loss.backward()
    assert model.blocks[0].attn.rpe_table.grad.abs().sum() > 0
    assert model.features(torch.randn(3, 1, 16, 16)).shape == (3, cfg.embed_dim)


def _irpe_axis(d: int) -> int:
    """iRPE's piecewise index of one axis' offset, written out from its paper (Eq. 18)
    with the constants of LoMaR's reference (ratio 1.9: alpha, beta, gamma = 1.9, 3.8,
    15.2); the reference clips the rounded value at beta, then int() truncates it."""
    alpha, beta, gamma = 1.9, 3.8, 15.2
    if abs(d) <= alpha:
        return d
    v = round(alpha + math.log(abs(d) / alpha) / math.log(gamma / alpha) * (beta - alpha))
    return int(math.copysign(min(v, beta), d))


def _reference_buckets(side: int) -> torch.Tensor:
    """Product buckets of a cls token and a side x side grid: (row + 3) * 7 + (col + 3)
    of the indexed offset query - key; 49, the extra bucket, for pairs with the cls token."""
    cells = [divmod(i, side) for i in range(side * side)]
    grid = [[(_irpe_axis(ri - rj) + 3) * 7 + _irpe_axis(ci - cj) + 3 for rj, cj in cells]
            for ri, ci in cells]
    out = torch.full((1 + side * side, 1 + side * side), 49)
    out[1:, 1:] = torch.tensor(grid)
    return out


def test_lomar_relative_position_buckets_match_the_reference():
    # per axis: offsets 0 and +-1 exact, +-2 and +-3 share a bucket, +-4 and beyond the last
    assert [_irpe_axis(d) for d in range(-6, 7)] == [-3, -3, -3, -2, -2, -1, 0, 1, 2, 2, 3, 3, 3]
    # worked pair of a 7x7 window: query (0, 0), key (2, 5): offset (-2, -5) -> (-2, -3)
    # -> (1, 0) after the shift by 3 -> bucket 1 * 7 + 0 = 7
    assert irpe_buckets(7, torch.device("cpu"))[1 + 0, 1 + 2 * 7 + 5] == 7
    # every pair of a window, and of a whole 14x14 image (offsets up to 13 share the window's buckets)
    for side in (7, 14):
        assert torch.equal(irpe_buckets(side, torch.device("cpu")), _reference_buckets(side))


def test_lomar_attention_adds_the_contextual_term_on_keys():
    """logit(i, j) = q_i . k_j / sqrt(head_dim) + q_i . r[:, bucket(i, j)], one table r
    shared by the heads, on a cls token and a 3x3 grid."""
    torch.manual_seed(0)
    attn = IRPEAttention(12, 3).eval()
    with torch.no_grad():
        attn.rpe_table.normal_()
    x = torch.randn(2, 10, 12)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 10, 3, 3, 4).permute(2, 0, 3, 1, 4)
        term = attn.position_logits(q)
        # query (0, 0), key (2, 1): offset (-2, -1) -> (1, 2) after the shift -> bucket 9
        assert torch.allclose(term[:, :, 1, 1 + 2 * 3 + 1], q[:, :, 1] @ attn.rpe_table[:, 9])
        assert torch.allclose(term[:, :, 0, 5], q[:, :, 0] @ attn.rpe_table[:, 49])  # cls token
        per_pair = attn.rpe_table[:, _reference_buckets(3)]  # (head_dim, N, N)
        logits = q @ k.transpose(-2, -1) / 2 + torch.einsum("bhid,dij->bhij", q, per_pair)
        out = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 12))
        assert torch.allclose(attn(x), out, atol=1e-5)


def test_lomar_probe_encodes_the_whole_image_globally():
    """As the reference's evaluation model: the whole image in one sequence, so the
    window size does not change the probe, and a far patch reaches every token."""
    torch.manual_seed(0)
    small = build_model(_cfg(model="lomar", window_size=3))
    large = build_model(_cfg(model="lomar", window_size=6))
    large.load_state_dict(small.state_dict())
    x = torch.randn(2, 1, 16, 16)
    far = x.clone()
    far[:, :, :2, :2] += 1  # the top-left patch of the 8x8 grid
    outputs = []
    small.norm.register_forward_hook(lambda module, inputs, out: outputs.append(out))
    with torch.no_grad():
        feats = small.features(x)
        small.features(far)
        assert torch.allclose(large.features(x), feats, atol=1e-6)
    assert outputs[0].shape == (2, 1 + 64, small.cfg.embed_dim)  # cls and all 64 patches
    assert torch.allclose(feats, outputs[0][:, 1:].mean(dim=1), atol=1e-6)
    assert not torch.allclose(outputs[0][:, -1], outputs[1][:, -1])  # the bottom-right token


@pytest.mark.parametrize("kw,field", [
    ({"mask_ratio": 1.0}, "mask_ratio"), ({"mask_ratio": 0.0}, "mask_ratio"),
    ({"patch_size": 5}, "patch_size"), ({"patch_size": 4, "mask_unit": 3}, "mask_unit"),
    ({"model": "lomar", "window_size": 9, "patch_size": 4}, "window_size"),
    ({"preset": "vit_giant"}, "preset"), ({"dataset": "imagenet"}, "dataset"),
])
def test_impossible_configs_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kw)
