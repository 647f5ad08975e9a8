"""Training throughput of our MAE against Hugging Face's ViTMAE, and against the
machine's matrix-product rate (and, on a GPU, its bf16 peak: model-FLOPs utilisation).

Both models train in one process with the same thread settings, AdamW, the same
random batches, in alternating rounds so that noise from other work on the
machine hits both alike: fp32 on the CPU, bf16 autocast on a GPU. Ours runs
through TrainStep, the exact code path of the trainer.

    python bench/trainer_throughput.py [--rounds 9] [--steps-per-round 2] [--threads N]
    python bench/trainer_throughput.py --device cuda --preset vit_base --img-size 224 \
        --patch-size 16 --in-chans 3 --batch 128      # ViT-B/16 MAE (bench/gpu_check.sh)

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.resources import local_cpus, use_threads, wait_passively  # noqa: E402

wait_passively()  # as trainers.pretrain's workers run; before torch loads

import torch  # noqa: E402

from trainers.config import TrainConfig  # noqa: E402
from trainers.flops import linear, train_flops_per_image  # noqa: E402
from trainers.models import build_model  # noqa: E402
from trainers.mask_counts import kept_patches  # noqa: E402
from trainers.optim import build_optimizer, build_schedule  # noqa: E402
from trainers.step import TrainStep  # noqa: E402

MATMUL_N = 2048
BANK = 4  # distinct random batches, cycled
# dense bf16 peak, TFLOP/s, by the GPU's name (the vendors' data sheets; SXM parts)
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, repeats: int = 8) -> float:
    """GFLOP/s of a square MATMUL_N torch.mm (2 FLOPs per multiply-add): fp32 on the
    CPU, bf16 on a GPU (the precision each trains in)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = MATMUL_N * (4 if device.type == "cuda" else 1)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


def our_step(cfg: TrainConfig, batches: list[torch.Tensor], device: torch.device) -> Callable[[int], float]:
    """One optimizer step of our trainer's code path per call."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    step = TrainStep(model, optimizer, build_schedule(optimizer, cfg), cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
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


def hf_step(cfg: TrainConfig, batches: list[torch.Tensor], device: torch.device) -> Callable[[int], float]:
    """One optimizer step of ViTMAEForPreTraining with the same AdamW settings (and
    the same autocast as TrainStep)."""
    from transformers import ViTMAEForPreTraining

    from trainers.step import use_bf16

    torch.manual_seed(cfg.seed)
    model = ViTMAEForPreTraining(hf_config(cfg)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay, fused=True)
    bf16 = use_bf16(cfg, device)

    def run(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
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


def timed(run: Callable[[int], float], start: int, steps: int, batch: int, device: torch.device) -> float:
    """Images per second over `steps` steps starting at step index `start`."""
    sync(device)
    t = time.perf_counter()
    for i in range(start, start + steps):
        run(i)
    sync(device)
    return steps * batch / (time.perf_counter() - t)


def bf16_peak(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, when its name is known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in BF16_PEAK_TFLOPS.items() if key in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=local_cpus(), help="default: the cores this process is given")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="cpu_small")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    args.threads = use_threads(args.threads)
    device = torch.device(args.device)
    print(f"{args.threads} torch threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)

    cfg = TrainConfig(preset=args.preset, img_size=args.img_size, patch_size=args.patch_size,
                      in_chans=args.in_chans, batch_size=args.batch, mask_ratio=0.75, steps=10_000,
                      use_gpu=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen).to(device)
               for _ in range(BANK)]
    runs = {"ours": our_step(cfg, batches, device), "hf": hf_step(cfg, batches, device)}

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
        mm.append(matmul_rate(device))
        # Alternate which model goes first, so neither always follows the matmul.
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            rates[name].append(timed(runs[name], start, args.steps_per_round, cfg.batch_size, device))
        start += args.steps_per_round
        print(f"round {r}: matmul {mm[-1]:.1f} GFLOP/s  " +
              "  ".join(f"{n} {v[-1]:.1f} img/s" for n, v in rates.items()), flush=True)

    mm_rate = statistics.median(mm) * 1e9
    ours, hf = (statistics.median(rates[n]) for n in ("ours", "hf"))
    flops_ours, flops_hf = train_flops_per_image(cfg), hf_train_flops_per_image(cfg)
    print(f"device={args.device} preset={cfg.preset} img={cfg.img_size} patch={cfg.patch_size} "
          f"threads={args.threads} batch={cfg.batch_size} rounds={args.rounds} "
          f"steps_per_round={args.steps_per_round}")
    print(f"matmul_{'bf16' if device.type == 'cuda' else 'fp32'}_gflops={mm_rate / 1e9:.1f}")
    if (peak := bf16_peak(device)) is not None:
        print(f"mfu_vs_bf16_peak ours={flops_ours * ours / peak:.1%} hf={flops_hf * hf / peak:.1%} "
              f"(peak {peak / 1e12:.0f} TFLOP/s)")
    print(f"train_gflop_per_image ours={flops_ours / 1e9:.4f} hf={flops_hf / 1e9:.4f}")
    print(f"ours_img_per_s={ours:.1f} share_of_matmul={flops_ours * ours / mm_rate:.1%}")
    print(f"hf_img_per_s={hf:.1f} share_of_matmul={flops_hf * hf / mm_rate:.1%}")
    print(f"ratio_vs_hf={ours / hf:.3f}")


if __name__ == "__main__":
    main()
