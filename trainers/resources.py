"""How a run spreads over CPUs: what its Train workers ask Ray for when the run is
given a whole cluster, the threads a worker trains and decodes its training images
with, and the cores a process on this machine may use."""
from __future__ import annotations

import os
from collections.abc import Sequence

from trainers.config import TrainConfig


def cpus_per_worker(node_cpus: Sequence[float], workers: int) -> int:
    """The most whole CPUs each of `workers` workers can have with every worker placed
    (a worker's CPUs on one node): on 2 cores, one worker gets both. 1 when even that
    does not fit, and Ray waits for CPUs as it would for a run asking 1 per worker."""
    fits = [c for c in range(1, int(max(node_cpus, default=1)) + 1)
            if sum(int(n // c) for n in node_cpus) >= workers]
    return max(fits, default=1)


def local_cpus() -> int:
    """The cores this process may run on: its CPU affinity, which a container or
    `taskset` can make smaller than os.cpu_count() (the machine's)."""
    return len(os.sched_getaffinity(0))


def wait_passively() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set otherwise. A run's torch threads share its
    cores with the loader's threads and, on a shared machine, with other work: OpenMP
    threads that spin while they wait then stall each other (measured here under load,
    the tiny step: 7 images/s on 2 spinning threads, 147 on 2 passive ones, 80 on one).
    OpenMP reads it when torch loads, so call this before torch is first imported; a Ray
    started afterwards passes it to its workers."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def train_threads(cfg: TrainConfig) -> int:
    """The torch intra-op threads a worker trains with: cfg.threads_per_worker, else one
    per CPU the worker is given."""
    return cfg.threads_per_worker or cfg.cpus_per_worker


def use_threads(threads: int) -> int:
    """Train with `threads` torch intra-op threads in this process (torch's own default
    counts the machine's cores, not the ones this process is given); returns the count
    torch reports back, for a run's or a bench's header."""
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def node_cpus(use_gpu: bool = False) -> list[float]:
    """The CPUs of each live node of the Ray cluster this process is connected to; with
    use_gpu, of each GPU instead (its node's CPUs shared among the node's GPUs), as a
    worker then takes one GPU."""
    import ray

    out = []
    for node in (n for n in ray.nodes() if n["Alive"]):
        cpus, gpus = node["Resources"].get("CPU", 0.0), int(node["Resources"].get("GPU", 0))
        out += [cpus / gpus] * gpus if use_gpu else [cpus]
    return out


def loader_threads(cfg: TrainConfig) -> int:
    """cfg.num_loader_workers, else one per CPU of the worker. They share the cores with
    the step's torch threads but take only the decoding the step consumes: once ahead
    of it by the queue's depth they block (and torch's OpenMP threads wait passively,
    see trainers.pretrain). On GPUs the step leaves the cores idle, and at 224 px
    decoding needs dozens of cores per GPU (bench/RESULTS.md)."""
    return cfg.cpus_per_worker if cfg.num_loader_workers is None else cfg.num_loader_workers
