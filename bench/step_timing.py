"""Seconds per optimizer step of a TrainConfig, for benches that size their runs by time."""
from __future__ import annotations

import time


def seconds_per_step(cfg, budget_s: float) -> tuple[float, int]:
    """Median wall seconds of a data batch + optimizer step, on the trainer's code path
    with the worker's thread count; returns (seconds, steps timed). The imports are
    here so that a bench that only spawns runs does not load torch for nothing."""
    import torch

    from trainers.data import PretrainStream
    from trainers.models import build_model
    from trainers.optim import build_optimizer, build_schedule
    from trainers.resources import train_threads, use_threads
    from trainers.step import TrainStep

    use_threads(train_threads(cfg))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg)
    step = TrainStep(model, opt, build_schedule(opt, cfg), cfg, torch.device("cpu"))
    stream, gen = PretrainStream(cfg, 0, 1), torch.Generator()
    for i in range(3):
        step(i, [stream.batch(i)[0]], gen)
    times, t0 = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - t0 < budget_s:
        t = time.perf_counter()
        step(3 + len(times), [stream.batch(3 + len(times))[0]], gen)
        times.append(time.perf_counter() - t)
    # The median: a burst of other work on the shared machine does not set the budget.
    return sorted(times)[len(times) // 2], len(times)
