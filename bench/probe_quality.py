"""Is a few minutes of pretraining worth anything? Linear probe and k-NN accuracy of
the frozen encoder of a `tiny` MAE pretrained on Fashion-MNIST for a fixed wall-time
budget, against the same classifiers on raw pixels.

    python bench/probe_quality.py [--minutes 5] [--base-lr 5e-3] [--patch-size 4] ...

1. Warm-up: a few optimizer steps of exactly the configuration to run (the trainer's
   PretrainStream and TrainStep, with the Ray worker's thread count) measure the
   seconds per step; the run gets floor(budget / that) steps.
2. The run: `python -m trainers.pretrain` as a subprocess, i.e. the real trainer on
   Ray Train, which evaluates the encoder at its last step.
3. The probes: the final checkpoint's encoder is loaded here; its features
   (`extract_features`) and the raw pixels of the same images (the model's input:
   the central crop resized to img_size and normalised) go through the same
   `linear_probe_top1` and `knn_top1`, on the same subsets `load_eval_arrays` picks
   for the trainer's own evaluation (train split: probe_train_size images, test
   split: probe_eval_size, both chosen by the run's seed).

The last line is `probe_vs_raw=<linear probe on features / linear probe on pixels>`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainers.resources import local_cpus, train_threads, use_threads, wait_passively  # noqa: E402

wait_passively()  # as trainers.pretrain's workers run (the run inherits it); before torch loads

import torch  # noqa: E402

from trainers.config import TrainConfig  # noqa: E402
from trainers.data import load_eval_arrays  # noqa: E402
from trainers.evaluation import extract_features, knn_top1, linear_probe_top1  # noqa: E402
from trainers.models import build_model  # noqa: E402
from step_timing import seconds_per_step  # noqa: E402  (bench/, the script's folder)

# Defaults; what set them, and what is measured of them: bench/RESULTS.md ("## probe_quality").
DEFAULTS = dict(preset="tiny", model="mae", dataset="fashion_mnist", img_size=32, patch_size=4,
                batch_size=64, base_lr=5e-3, mask_ratio=0.75, norm_pix_loss=True,
                probe_train_size=10000, probe_eval_size=10000, log_every_steps=100)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="wall-time budget of the optimizer steps")
    p.add_argument("--warmup-seconds", type=float, default=8.0, help="timed warm-up (after 3 untimed steps)")
    p.add_argument("--steps", type=int, default=None, help="skip the warm-up and run this many steps")
    p.add_argument("--out", default=None, help="run folder (default: a temporary one, deleted)")
    for name, default in DEFAULTS.items():
        kind = type(default)
        conv = (lambda s: s.lower() in ("1", "true", "yes", "on")) if kind is bool else kind
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=conv, default=default,
                       help=f"TrainConfig.{name} (default: {default})")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other TrainConfig field, e.g. --set warmup_steps=200 (repeatable)")
    return p.parse_args(argv)


def config_fields(args: argparse.Namespace) -> dict:
    """The run's TrainConfig fields. Its one worker gets every core this process is given
    (as trainers.pretrain gives it this machine's) unless --set says otherwise, passed on
    to the run, so that the warm-up times the step with the run's threads."""
    fields = {name: getattr(args, name) for name in DEFAULTS}
    fields["cpus_per_worker"] = local_cpus()
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key.replace("-", "_")] = value  # pydantic coerces the string
    return fields


def cli_args(fields: dict) -> list[str]:
    out = []
    for k, v in fields.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def final_checkpoint(run_dir: str) -> str:
    """state.pt of the checkpoint with the most steps."""
    paths = glob.glob(os.path.join(run_dir, "ray", "**", "state.pt"), recursive=True)
    if not paths:
        raise SystemExit(f"no checkpoint under {run_dir}/ray")
    steps = {p: torch.load(p, map_location="cpu", weights_only=True)["progress"]["step"] for p in paths}
    return max(steps, key=steps.get)


def main(argv=None) -> int:
    args = parse_args(argv)
    fields = config_fields(args)
    cfg0 = TrainConfig(**fields, steps=1000)
    budget_s = args.minutes * 60
    if args.steps is None:
        sec, timed = seconds_per_step(cfg0, args.warmup_seconds)
        steps = max(1, math.floor(budget_s / sec))
        print(f"warm-up: {sec * 1000:.0f} ms/step over {timed} steps -> {steps} steps "
              f"for {args.minutes:g} min", flush=True)
    else:
        steps = args.steps
    cfg = TrainConfig(**fields, steps=steps)
    print(f"config: preset {cfg.preset}, img {cfg.img_size} patch {cfg.patch_size} (L={cfg.seq_len}), "
          f"batch {cfg.batch_size}, base_lr {cfg.base_lr:g} (lr {cfg.lr:.3g}), warmup {cfg.warmup_steps}, "
          f"mask {cfg.mask_ratio}, norm_pix_loss {cfg.norm_pix_loss}, augment {cfg.augment}, "
          f"probe {cfg.probe_train_size}/{cfg.probe_eval_size}, {cfg.cpus_per_worker} CPU(s) and "
          f"{train_threads(cfg)} torch thread(s)", flush=True)

    tmp = None
    run_dir = args.out
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="probe-quality-")
        run_dir = tmp.name
    cmd = [sys.executable, "-m", "trainers.pretrain", "--out", run_dir,
           *cli_args({**fields, "steps": steps})]
    if os.path.exists(os.path.join(run_dir, "ray")):
        raise SystemExit(f"{run_dir} already holds a run (the trainer would resume it); give a new --out")
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "pretrain.log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(Path(log_path).read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"pretraining failed (exit {proc.returncode})")
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    train_s = metrics["steps"] * cfg.batch_size / metrics["images_per_s"]
    print(f"pretraining: {metrics['steps']} steps, {train_s:.0f} s in optimizer steps, "
          f"{wall:.0f} s wall with Ray start-up and evaluation; loss {metrics['first_loss']:.3f} -> "
          f"{metrics['loss']:.3f}", flush=True)

    # The frozen encoder of the final checkpoint, on the subsets the trainer evaluated.
    use_threads(train_threads(cfg))
    state = torch.load(final_checkpoint(run_dir), map_location="cpu", weights_only=True)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    train_x, train_y = load_eval_arrays(cfg, "train", cfg.probe_train_size, cfg.seed)
    test_x, test_y = load_eval_arrays(cfg, "test", cfg.probe_eval_size, cfg.seed)
    feat_tr, feat_te = extract_features(model, train_x), extract_features(model, test_x)
    results = {}
    for name, (tr, te) in {"encoder": (feat_tr, feat_te), "pixels": (train_x, test_x)}.items():
        t = time.perf_counter()
        probe = linear_probe_top1(tr, train_y, te, test_y)
        knn = knn_top1(tr, train_y, te, test_y, k=cfg.knn_k)
        results[name] = (probe, knn, tr.flatten(1).shape[1], time.perf_counter() - t)
    if tmp is not None:
        tmp.cleanup()

    print(f"{'':8} {'dims':>5} {'linear':>7} {'k-NN':>7}")
    for name, (probe, knn, dims, _) in results.items():
        print(f"{name:8} {dims:5d} {probe:7.4f} {knn:7.4f}")
    print(f"trainer's own evaluation of that encoder: linear {metrics['probe_top1']:.4f}, "
          f"k-NN {metrics['knn_top1']:.4f}")
    enc, pix = results["encoder"], results["pixels"]
    budget = f"{args.minutes:g} min" if args.steps is None else f"{steps} steps given"
    print(f"date {dt.date.today().isoformat()}  budget {budget}  "
          f"knn_vs_raw={enc[1] / pix[1]:.3f}")
    print(f"probe_vs_raw={enc[0] / pix[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
