"""System metrics of a trial's MLflow run on GPUs: its rank-0 Train worker's GPU
utilisation and memory, and that node's CPU, sampled by MLflow's own monitors.

MLflow's SystemMetricsMonitor samples the machine it runs on and writes to the
tracking server itself. Neither fits a trial: its driver and relay run on the
head (infra/cluster-hardened.yaml keeps drivers there, and its head has no GPU), and a GPU
node may not reach the tracking server (there MLflow listens on the head's
loopback). So MLflow's monitors sample inside the rank-0 Train worker, and the
samples travel through the trial's relay (orchestrator/relay.py) under MLflow's
names (system/...), which its UI shows in the run's System metrics tab.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import ray.train
# Train v2 runs a WorkerCallback in each worker process (a DeveloperAPI; Train's
# public UserCallback runs in its controller, which is not on the GPU node).
from ray.train.v2._internal.execution.callback import WorkerCallback

logger = logging.getLogger(__name__)

SAMPLE_EVERY_S = 10.0  # MLflow's default sampling interval


def gpu_monitors() -> list:
    """MLflow's CPU monitor, and its GPU monitor narrowed to this worker's GPU:
    MLflow's reports every GPU of the node, other trials' included. Its
    metrics are named gpu_0_... for the worker's GPU. Raises without
    nvidia-ml-py or NVML."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    gpu = GPUMonitor()
    # Ray's GPU ids are the node's CUDA device indices, which NVML numbers alike on
    # nodes of identical GPUs
    gpu.gpu_handles = [gpu.gpu_handles[int(i)] for i in ray.get_gpu_ids()]
    return [CPUMonitor(), gpu]


class SystemMetrics(WorkerCallback):
    """A Ray Train callback: on the rank-0 worker, a thread sends what the
    monitors sampled to the relay every `interval_s`, step 0, 1, 2, ... as
    MLflow's monitor does."""

    def __init__(self, relay, interval_s: float = SAMPLE_EVERY_S, monitors: Callable[[], list] = gpu_monitors):
        self._relay, self._interval_s, self._monitors = relay, interval_s, monitors
        self._stop = None

    def after_init_train_context(self):
        if ray.train.get_context().get_world_rank() != 0:
            return
        try:
            monitors = self._monitors()
        except Exception as e:  # no NVML on this node: the trial trains on without system metrics
            logger.warning(f"no system metrics for this trial: {type(e).__name__}: {e}")
            return
        self._stop = threading.Event()
        threading.Thread(target=self._sample, args=(monitors,), daemon=True, name="system-metrics").start()

    def before_worker_shutdown(self):
        if self._stop is not None:
            self._stop.set()

    def _sample(self, monitors: list) -> None:
        step = 0
        while not self._stop.wait(self._interval_s):
            metrics = {}
            for monitor in monitors:
                monitor.collect_metrics()
                metrics.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            self._relay.log.remote(step, {f"system/{k}": float(v) for k, v in metrics.items()})
            step += 1
