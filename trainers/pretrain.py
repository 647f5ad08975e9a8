"""One pretraining run without a study, for debugging a config.

    python -m trainers.pretrain --model mae --preset tiny --dataset fashion_mnist --steps 50 --out DIR

Running the same command again with the same --out resumes from the latest
checkpoint and stops at the same step count. Without --cpus-per-worker, the
workers share every CPU of the Ray cluster (of this machine, without --address;
with --use-gpu, of the GPUs' nodes), and each trains with as many torch threads
as it has CPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from pydantic import ValidationError

from trainers.config import PRESETS, TrainConfig

ROUTED = ("out", "address")


def _arg_type(annotation):
    """argparse type for a TrainConfig field (Optional[X] -> X)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args and typing.get_origin(annotation) is typing.Union else annotation
    if base is bool:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if typing.get_origin(base) is tuple:
        inner = typing.get_args(base)[0]
        return lambda s: tuple(inner(v) for v in s.split(","))
    if typing.get_origin(base) is typing.Literal:
        return str
    return base if base in (int, float, str) else str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainers.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for checkpoints and metrics.json")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start Ray here)")
    for name, info in TrainConfig.model_fields.items():
        default = info.default
        extra = f" (presets: {', '.join(PRESETS)})" if name == "preset" else ""
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_arg_type(info.annotation),
                       default=argparse.SUPPRESS, help=f"default: {default}{extra}")
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    out, address = os.path.abspath(args.pop("out")), args.pop("address")
    try:
        cfg = TrainConfig(**args)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"{x}: " for x in err["loc"])
        print(f"error: {where}{err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2

    from trainers.launch import run_pretraining
    from trainers.ray_session import init_ray
    from trainers.resources import cpus_per_worker, node_cpus, train_threads

    os.makedirs(out, exist_ok=True)
    init_ray(address)
    if "cpus_per_worker" not in args:
        cfg = TrainConfig(**args, cpus_per_worker=cpus_per_worker(node_cpus(cfg.use_gpu), cfg.workers))
    print(f"pretrain: {cfg.workers} worker(s) x {cfg.cpus_per_worker} CPU(s), "
          f"{train_threads(cfg)} torch thread(s) each", flush=True)
    result = run_pretraining(cfg, os.path.join(out, "ray"), "pretrain", echo=True)
    metrics = dict(result.metrics or {})
    metrics["steps"] = metrics.pop("step", 0)
    metrics["config"] = cfg.resolved()
    with open(os.path.join(out, "metrics.json.tmp"), "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(os.path.join(out, "metrics.json.tmp"), os.path.join(out, "metrics.json"))
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=1))
    if metrics.get("status") == "diverged":
        print(f"error: {metrics.get('reason', 'diverged')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
