"""Training steps of each method on one device: MAE, long-sequence MAE with 2x2
mask units and MFF, and LoMaR (7x7 windows, the paper's 4), through TrainStep,
the trainer's own code path (bf16 autocast on a GPU). Prints images/s, the
analytic FLOPs, the loss after the timed steps and the peak GPU memory.

    python bench/model_steps.py --device cuda --preset vit_base --img-size 224 --patch-size 16 \\
        --in-chans 3 --batch 64 --steps 10           # part of bench/gpu_check.sh

Last line: `lomar_vs_mae_img_per_s=<LoMaR images/s over MAE's>`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.resources import local_cpus, use_threads, wait_passively  # noqa: E402

wait_passively()  # as trainers.pretrain's workers run; before torch loads

import torch  # noqa: E402

from trainers.config import TrainConfig  # noqa: E402
from trainers.flops import train_flops_per_image  # noqa: E402
from trainers.models import build_model  # noqa: E402
from trainers.optim import build_optimizer, build_schedule  # noqa: E402
from trainers.step import TrainStep  # noqa: E402

VARIANTS = {"mae": {}, "mae k2 mff": {"mask_unit": 2, "mff": True},
            "lomar w7": {"model": "lomar", "window_size": 7, "windows": 4}}


class Stepper:
    """TrainStep on one fixed random batch of `cfg`'s shape, its model built once: call
    it for more steps (the step count carries on, so the schedule moves as in a run)."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        torch.manual_seed(0)
        model = build_model(cfg).to(device).train()
        opt = build_optimizer(model, cfg)
        self.step = TrainStep(model, opt, build_schedule(opt, cfg), cfg, device)
        self.device, self.done = device, 0
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.batch = torch.rand(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)

    def __call__(self, steps: int) -> tuple[float, float]:
        """(wall seconds of `steps` more steps, the last loss)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t, loss = time.perf_counter(), float("nan")
        for _ in range(steps):
            loss = self.step(self.done, [self.batch], self.gen)
            self.done += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t, loss


def run(cfg: TrainConfig, device: torch.device, steps: int) -> tuple[float, float]:
    """(images/s over `steps` steps after two warm-up steps, the last loss)."""
    stepper = Stepper(cfg, device)
    stepper(2)
    seconds, loss = stepper(steps)
    return steps * cfg.batch_size / seconds, loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device={device} {use_threads(local_cpus())} torch threads (the cores this process is given), "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)
    rates = {}
    for name, extra in VARIANTS.items():
        cfg = TrainConfig(preset=args.preset, img_size=args.img_size, patch_size=args.patch_size,
                          in_chans=args.in_chans, batch_size=args.batch, steps=1000,
                          use_gpu=device.type == "cuda", **extra)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rates[name], loss = run(cfg, device, args.steps)
        memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        print(f"{name}: {rates[name]:.1f} img/s, {train_flops_per_image(cfg) / 1e9:.3f} GFLOP/image, "
              f"loss {loss:.4f}{'' if math.isfinite(loss) else ' NOT FINITE'}, peak memory {memory:.1f} GiB",
              flush=True)
        if not math.isfinite(loss):
            sys.exit(f"{name}: the loss is not finite")
    print(f"lomar_vs_mae_img_per_s={rates['lomar w7'] / rates['mae']:.3f}")


if __name__ == "__main__":
    main()
