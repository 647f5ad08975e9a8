"""Training step cost of LoMaR against MAE at ViT-B/16 sizes on 3-channel images, at
224, 384 and 448 px: analytic training FLOPs per image (trainers.flops, 1 multiply-add
= 2 FLOPs) and measured seconds per optimizer step, on this machine's CPU.

LoMaR as the paper's code runs it by default (junchen14/LoMaR, main_pretrain_lomar.py
and its README's pretraining command: --window_size 7 --num_window 4 --mask_ratio 0.8):
4 windows of 7x7 patches per image, 80% masked inside each; MAE with 75% masked. Both
train through bench/model_steps.Stepper (TrainStep, the trainer's own code path, fp32
on the CPU) on a fixed random batch. Per resolution both models are built once, take a
warm-up step, then are timed in alternating rounds (which goes first swaps each round),
so that load from other work on the machine hits both alike: the figure is the median
of the per-round ratios, MAE wall seconds per step over LoMaR's. The same ratio of this
process's CPU seconds is printed beside it: steadier when other work takes the cores.
Seconds on a shared machine are only comparable within a run.

    python bench/lomar_vs_mae.py [--batch 1] [--rounds 9] [--sizes 224,384,448]

Last line: `lomar_speedup_448=<MAE seconds per step / LoMaR's at 448 px>` (the largest
of --sizes).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_steps import VARIANTS, Stepper  # noqa: E402  (bench/; sets OMP_WAIT_POLICY before torch loads)

import torch  # noqa: E402

from trainers.config import TrainConfig  # noqa: E402
from trainers.flops import train_flops_per_image  # noqa: E402
from trainers.resources import local_cpus, use_threads  # noqa: E402

METHODS = {"mae": VARIANTS["mae"], "lomar": VARIANTS["lomar w7"]}


def configs(args: argparse.Namespace, size: int) -> dict[str, TrainConfig]:
    """Each method's config at `size` px; mask ratios are each method's default."""
    return {name: TrainConfig(preset=args.preset, img_size=size, patch_size=args.patch_size,
                              in_chans=3, batch_size=args.batch, steps=1000, **extra)
            for name, extra in METHODS.items()}


def measure(cfgs: dict[str, TrainConfig], rounds: int, steps: int,
            warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds and CPU seconds (this process's, all its threads) per step of each
    method, per round, the methods alternating."""
    device = torch.device("cpu")
    steppers = {name: Stepper(cfg, device) for name, cfg in cfgs.items()}
    for stepper in steppers.values():
        stepper(warmup)
    wall: dict[str, list[float]] = {name: [] for name in steppers}
    cpu: dict[str, list[float]] = {name: [] for name in steppers}
    for r in range(rounds):
        for name in (list(steppers) if r % 2 == 0 else list(steppers)[::-1]):
            c = time.process_time()
            seconds, _ = steppers[name](steps)
            cpu[name].append((time.process_time() - c) / steps)
            wall[name].append(seconds / steps)
        print(f"  round {r}: " + "  ".join(f"{n} {wall[n][-1]:.2f} s ({cpu[n][-1]:.2f} CPU s)" for n in wall)
              + f"  ratio {wall['mae'][-1] / wall['lomar'][-1]:.2f} ({cpu['mae'][-1] / cpu['lomar'][-1]:.2f} CPU)"
              + f"  load {os.getloadavg()[0]:.1f}", flush=True)
    return wall, cpu


def ratio(seconds: dict[str, list[float]]) -> float:
    """The median over rounds of MAE's seconds over LoMaR's in the same round."""
    return statistics.median(m / lo for m, lo in zip(seconds["mae"], seconds["lomar"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="224,384,448", help="image sizes in px, comma-separated")
    p.add_argument("--preset", default="vit_base")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=1)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = use_threads(local_cpus())
    example = configs(args, sizes[0])
    print(f"cpu, {threads} torch threads (every core this process is given), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load average {os.getloadavg()[0]:.1f}; "
          f"preset {args.preset}, patch {args.patch_size}, 3 channels, batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps_per_round} step(s) after {args.warmup_steps} warm-up; "
          f"MAE mask {example['mae'].mask_ratio}; LoMaR {example['lomar'].windows} windows of "
          f"{example['lomar'].window_size}x{example['lomar'].window_size}, mask {example['lomar'].mask_ratio} "
          f"inside each", flush=True)
    t0 = time.perf_counter()
    rows = []
    for size in sizes:
        cfgs = configs(args, size)
        print(f"{size} px (L={cfgs['mae'].seq_len}):", flush=True)
        wall, cpu = measure(cfgs, args.rounds, args.steps_per_round, args.warmup_steps)
        gc.collect()
        flops = {name: train_flops_per_image(cfg) for name, cfg in cfgs.items()}
        sec = {name: statistics.median(s) for name, s in wall.items()}
        rows.append((size, cfgs["mae"].seq_len, flops, sec, ratio(wall), ratio(cpu)))

    print(f"\n{'px':>4} {'L':>4} | {'GFLOP/img':>9} {'':>7} {'MAE/':>6} | {'s/step':>7} {'':>7} "
          f"{'MAE/':>6} {'MAE/':>6} | {'GFLOP/s':>7} {'':>7}")
    print(f"{'':>4} {'':>4} | {'MAE':>9} {'LoMaR':>7} {'LoMaR':>6} | {'MAE':>7} {'LoMaR':>7} "
          f"{'LoMaR':>6} {'CPU s':>6} | {'MAE':>7} {'LoMaR':>7}")
    for size, seq, flops, sec, wall_ratio, cpu_ratio in rows:
        rate = {n: flops[n] * args.batch / sec[n] / 1e9 for n in sec}
        print(f"{size:4d} {seq:4d} | {flops['mae'] / 1e9:9.1f} {flops['lomar'] / 1e9:7.1f} "
              f"{flops['mae'] / flops['lomar']:6.2f} | {sec['mae']:7.2f} {sec['lomar']:7.2f} {wall_ratio:6.2f} "
              f"{cpu_ratio:6.2f} | {rate['mae']:7.1f} {rate['lomar']:7.1f}")
    print(f"(s/step: wall, medians over rounds; MAE/LoMaR: medians of the per-round ratios of wall "
          f"seconds, and of this process's CPU seconds; GFLOP/s: analytic FLOPs over median wall "
          f"seconds) {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")
    print(f"lomar_speedup_{rows[-1][0]}={rows[-1][4]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
