"""System metrics of a trial's run: sampled on its rank-0 Train worker, only on GPUs,
and sent through the trial's relay (orchestrator/system_metrics.py)."""
import time

import pytest

from orchestrator.system_metrics import SystemMetrics
from orchestrator.trial import system_metrics_callbacks
from trainers.config import TrainConfig


@pytest.mark.parametrize("use_gpu", [False, True])
def test_system_metrics_are_sampled_exactly_when_the_trial_uses_gpus(use_gpu):
    cfg = TrainConfig(preset="tiny", steps=1, use_gpu=use_gpu)
    relay = object()
    callbacks = system_metrics_callbacks(cfg, relay)
    assert len(callbacks) == use_gpu
    assert all(isinstance(cb, SystemMetrics) and cb._relay is relay for cb in callbacks)


def test_rank_0_worker_sends_mlflow_monitor_samples_to_the_relay(ray_local, tmp_path):
    """A real Ray Train run of two CPU workers: only rank 0 samples (with MLflow's
    CPU monitor here, where there is no GPU), and its samples reach the relay as
    system/... metrics at steps 0, 1, 2, ..."""
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    @ray.remote(num_cpus=0)
    class Relay:
        def __init__(self):
            self.calls = []

        def log(self, step, metrics):
            self.calls.append((step, metrics))

        def get(self):
            return self.calls

    class Rank:
        """A monitor shaped as MLflow's that records the rank of the worker sampling."""

        def __init__(self):
            self.rank = ray.train.get_context().get_world_rank()

        def collect_metrics(self):
            pass

        def aggregate_metrics(self):
            return {"rank": self.rank}

        def clear_metrics(self):
            pass

    def cpu_and_rank():  # defined here, they travel to Ray's workers by value
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        return [CPUMonitor(), Rank()]

    relay = Relay.remote()

    def train(_):
        time.sleep(3)

    TorchTrainer(train, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(storage_path=str(tmp_path), name="system-metrics",
                                      callbacks=[SystemMetrics(relay, interval_s=0.5, monitors=cpu_and_rank)])
                 ).fit()
    calls = ray.get(relay.get.remote())
    assert len(calls) >= 2, calls
    assert [step for step, _ in calls] == list(range(len(calls)))
    for _, metrics in calls:
        assert metrics["system/rank"] == 0.0
        assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
