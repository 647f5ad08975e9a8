"""Training throughput of our MAE against Hugging Face's ViTMAE, and against the
machine's fp32 matrix-product rate.

Both models train in one process with the same thread settings, fp32 on the CPU,
AdamW, the same random 32x32 grayscale batches, in alternating rounds so that
noise from other work on the machine hits both alike. Ours runs through
TrainStep, the exact code path of the trainer.

    python bench/trainer_throughput.py [--rounds 9] [--steps-per-round 2] [--threads N]

The last line is `ratio_vs_hf=<ours / theirs images per second>`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.config import TrainConfig  # noqa: E402
from trainers.flops import linear, train_flops_per_image  # noqa: E402
from trainers.models import build_model  # noqa: E402
from trainers.mask_counts import kept_patches  # noqa: E402
from trainers.optim import build_optimizer, build_schedule  # noqa: E402
from trainers.step import TrainStep  # noqa: E402

CFG = dict(preset="cpu_small", img_size=32, patch_size=2, in_chans=1, batch_size=64,
           mask_ratio=0.75)
MATMUL_N = 2048
BANK = 4  # distinct random batches, cycled


def matmul_rate(repeats: int = 8) -> float:
    """fp32 GFLOP/s of a square MATMUL_N torch.mm (2 FLOPs per multiply-add)."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * MATMUL_N ** 3 * repeats / (time.perf_counter() - t) / 1e9


def our_step(cfg: TrainConfig, batches: list[torch.Tensor]) -> Callable[[int], float]:
    """One optimizer step of our trainer's code path per call."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    step = TrainStep(model, optimizer, build_schedule(optimizer, cfg), cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    return lambda i: step(i % cfg.steps, [batches[i % len(batches)]], gen)


def hf_config(cfg: TrainConfig):
    from transformers import ViTMAEConfig

    return ViTMAEConfig(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        decoder_hidden_size=cfg.decoder_embed_dim, decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
        mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss, attn_implementation="sdpa",
    )


def hf_step(cfg: TrainConfig, batches: list[torch.Tensor]) -> Callable[[int], float]:
    """One optimizer step of ViTMAEForPreTraining with the same AdamW settings."""
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(cfg.seed)
    model = ViTMAEForPreTraining(hf_config(cfg)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay, fused=True)

    def run(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(pixel_values=batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return run


def hf_train_flops_per_image(cfg: TrainConfig) -> float:
    """Our analytic count for the same architecture; HF's decoder also predicts the
    pixels of the cls and visible tokens, one extra (L + 1 - n_masked) x d x p^2 C
    linear, which is added here."""
    extra = linear(kept_patches(cfg.grid, cfg.mask_ratio) + 1, cfg.decoder_embed_dim,
                   cfg.patch_size ** 2 * cfg.in_chans)
    return train_flops_per_image(cfg) + 3 * extra


def timed(run: Callable[[int], float], start: int, steps: int, batch: int) -> float:
    """Images per second over `steps` steps starting at step index `start`."""
    t = time.perf_counter()
    for i in range(start, start + steps):
        run(i)
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = TrainConfig(**CFG, steps=10_000)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
               for _ in range(BANK)]
    runs = {"ours": our_step(cfg, batches), "hf": hf_step(cfg, batches)}

    t = time.perf_counter()
    for name, run in runs.items():
        for i in range(args.warmup_steps):
            run(i)
        print(f"warm-up {name}: {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()

    rates = {name: [] for name in runs}
    mm = []
    start = args.warmup_steps
    for r in range(args.rounds):
        mm.append(matmul_rate())
        # Alternate which model goes first, so neither always follows the matmul.
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            rates[name].append(timed(runs[name], start, args.steps_per_round, cfg.batch_size))
        start += args.steps_per_round
        print(f"round {r}: matmul {mm[-1]:.1f} GFLOP/s  " +
              "  ".join(f"{n} {v[-1]:.1f} img/s" for n, v in rates.items()), flush=True)

    mm_rate = statistics.median(mm) * 1e9
    ours, hf = (statistics.median(rates[n]) for n in ("ours", "hf"))
    flops_ours, flops_hf = train_flops_per_image(cfg), hf_train_flops_per_image(cfg)
    print(f"threads={args.threads} batch={cfg.batch_size} rounds={args.rounds} "
          f"steps_per_round={args.steps_per_round}")
    print(f"matmul_fp32_gflops={mm_rate / 1e9:.1f}")
    print(f"train_gflop_per_image ours={flops_ours / 1e9:.4f} hf={flops_hf / 1e9:.4f}")
    print(f"ours_img_per_s={ours:.1f} share_of_matmul={flops_ours * ours / mm_rate:.1%}")
    print(f"hf_img_per_s={hf:.1f} share_of_matmul={flops_hf * hf / mm_rate:.1%}")
    print(f"ratio_vs_hf={ours / hf:.3f}")


if __name__ == "__main__":
    main()
