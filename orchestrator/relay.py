"""A Ray actor that takes step metrics from Train workers and writes them to MLflow.

Workers call it fire-and-forget, so a slow or remote tracking server never
stalls training; it runs on the trial driver's node, where the tracking server
is reachable (on infra/cluster.yaml's head, MLflow listens on loopback only).
"""
from __future__ import annotations

import time

import ray
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
class MetricsRelay:
    def __init__(self, tracking_uri: str, run_id: str):
        self._client = MlflowClient(tracking_uri)
        self._run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def flush(self) -> bool:
        return True  # runs after every earlier log call from the same caller


def start_relay(tracking_uri: str, run_id: str):
    """A relay on this node (the trial driver's)."""
    here = ray.get_runtime_context().get_node_id()
    return MetricsRelay.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote(tracking_uri, run_id)
