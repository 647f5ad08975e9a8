"""Analytic FLOPs of one training step, per configuration.

One multiply-add counts as 2 FLOPs (as torch.utils.flop_counter does; fvcore
counts 1). Only matrix products are counted (norms, softmax and activations are
a few % at most), which is also what FlopCounterMode counts. A training step is
the forward plus a backward of twice the forward's matrix products, except the
patch projection, which needs no gradient for its input (the image).

MAE's encoder sees only the visible tokens and its decoder all of them, so the
compute of a run must come from here, never from 6 * params * tokens.
"""
from __future__ import annotations

from trainers.config import TrainConfig
from trainers.mask_counts import kept_patches, window_masked

# Buckets of LoMaR's iRPE table (trainers.models.blocks.IRPE_BUCKETS: 7 x 7 product
# buckets and the cls token's), repeated here to keep this module free of torch.
IRPE_BUCKETS = 7 * 7 + 1


def block_forward(tokens: int, dim: int, mlp_ratio: float) -> float:
    """One transformer block over a sequence: qkv, projection and MLP
    ((8 + 4r) d^2 per token, 24 d^2 for r = 4) plus QK^T and AV (4 n d per token)."""
    return tokens * ((8 + 4 * mlp_ratio) * dim * dim + 4 * tokens * dim)


def linear(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _mae_forward(c: TrainConfig) -> tuple[float, float]:
    """(forward FLOPs per image, of which the patch projection)."""
    L, pix = c.seq_len, c.patch_size ** 2 * c.in_chans
    n_keep = kept_patches(c.grid, c.mask_ratio)
    enc_tokens, dec_tokens = n_keep + 1, L + 1
    embed = linear(L, pix, c.embed_dim)
    f = embed + c.depth * block_forward(enc_tokens, c.embed_dim, c.mlp_ratio)
    if c.mff:
        f += (len(c.mff_layers) - 1) * linear(enc_tokens, c.embed_dim, c.embed_dim)
    f += linear(enc_tokens, c.embed_dim, c.decoder_embed_dim)
    f += c.decoder_depth * block_forward(dec_tokens, c.decoder_embed_dim, c.mlp_ratio)
    f += linear(L - n_keep, c.decoder_embed_dim, pix)  # predictions for masked patches only
    return f, embed


def _lomar_forward(c: TrainConfig) -> tuple[float, float]:
    """Each window is a sequence of its w*w patches and a cls token; iRPE adds to
    every block the product of each query with each bucket of its table."""
    tokens, pix = c.window_size ** 2 + 1, c.patch_size ** 2 * c.in_chans
    embed = linear(c.seq_len, pix, c.embed_dim)
    block = block_forward(tokens, c.embed_dim, c.mlp_ratio) + linear(tokens, c.embed_dim, IRPE_BUCKETS)
    f = embed + c.windows * c.depth * block
    f += c.windows * linear(window_masked(c.window_size, c.mask_ratio), c.embed_dim, pix)
    return f, embed


def forward_flops_per_image(c: TrainConfig) -> float:
    return (_lomar_forward if c.model == "lomar" else _mae_forward)(c)[0]


def train_flops_per_image(c: TrainConfig) -> float:
    fwd, embed = (_lomar_forward if c.model == "lomar" else _mae_forward)(c)
    return 3 * fwd - embed


def train_step_flops(c: TrainConfig) -> float:
    """FLOPs of one optimizer step over the global batch."""
    return train_flops_per_image(c) * c.batch_size


def run_flops(c: TrainConfig, steps: int | None = None) -> float:
    """Training FLOPs of a run of `steps` steps (default: the configured budget)."""
    return train_step_flops(c) * (c.steps if steps is None else steps)
