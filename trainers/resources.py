"""How a run spreads over CPUs: the threads a worker decodes its training images with."""
from __future__ import annotations

from trainers.config import TrainConfig


def loader_threads(cfg: TrainConfig) -> int:
    """cfg.num_loader_workers, else: on GPUs one per CPU of the worker (the step leaves
    them idle, and at 224 px decoding needs dozens of cores per GPU: bench/RESULTS.md);
    on CPUs one, which overlaps decoding with the step that uses the worker's cores."""
    if cfg.num_loader_workers is not None:
        return cfg.num_loader_workers
    return cfg.cpus_per_worker if cfg.use_gpu else 1
