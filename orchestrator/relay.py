"""A Ray actor that keeps a trial's MLflow run: it opens the run, then takes step
metrics from Train workers and writes them.

Workers call it fire-and-forget, and the trial driver never waits for it, so a
slow, remote or stopped tracking server never stalls training. It runs on the
trial driver's node, where the tracking server is reachable (on
infra/cluster-hardened.yaml's head, MLflow listens on loopback only). Its writes go
through an Outbox: while MLflow is away they wait and are retried. It outlives
its trial (a detached actor, named after the trial): however the trial ended,
finished or stopped early, the study's driver then asks it for what could not
be written (`finish_relay`), so nothing is dropped silently.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.outbox import Outbox
from orchestrator.tracking import log_params, trial_run

# How long the end of a trial waits for step metrics still queued for MLflow.
FLUSH_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class TrialRun:
    """The nested MLflow run of one trial: found again when the trial restarts."""

    experiment_id: str
    parent_run_id: str
    trial_id: str
    name: str
    tags: dict
    params: dict


@ray.remote(num_cpus=0)
class MetricsRelay:
    def __init__(self, tracking_uri: str, run: TrialRun):
        self._client = MlflowClient(tracking_uri)
        self._run_id = None
        self._last_heard: float | None = None  # when step metrics last arrived (time.time())
        self._outbox = Outbox(f"MLflow run of trial {run.trial_id}")
        self._outbox.put("opening the run", lambda: self._open(run))

    def _open(self, run: TrialRun) -> None:
        run_id, _ = trial_run(self._client, run.experiment_id, run.parent_run_id, run.trial_id, run.name, run.tags)
        log_params(self._client, run_id, run.params)  # the same values again on a restart: accepted
        self._run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._last_heard = time.time()
        now = int(self._last_heard * 1000)  # the time measured, not the time written
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self._outbox.put(f"step {step}", lambda: self._log(batch))

    def _log(self, batch: list) -> None:
        if self._run_id is None:
            raise RuntimeError("the trial's run could not be opened")
        self._client.log_batch(self._run_id, metrics=batch)

    def received(self) -> bool:
        return True  # runs after every earlier call from the same caller

    def last_heard(self) -> float | None:
        """When the trial's training last sent step metrics (None: not yet);
        the study's watchdog (orchestrator/watchdog.py) reads it."""
        return self._last_heard

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Wait for what is queued (calls from one caller run in order); returns
        the number of calls that never reached MLflow."""
        return len(self._outbox.drain(timeout_s))


def relay_name(study: str, trial_id: str) -> str:
    return f"metrics-relay:{study}:{trial_id}"


def start_relay(tracking_uri: str, study: str, run: TrialRun):
    """The trial's relay, on this node (the trial driver's); a restarted trial finds it again."""
    here = ray.get_runtime_context().get_node_id()
    return MetricsRelay.options(
        name=relay_name(study, run.trial_id), lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(tracking_uri, run)


def finish_relay(study: str, trial_id: str) -> int:
    """Wait for the ended trial's relay to write what it holds, stop it, and return
    how many calls never reached MLflow (0 if the trial had no relay)."""
    try:
        relay = ray.get_actor(relay_name(study, trial_id))
    except ValueError:
        return 0
    try:
        return ray.get(relay.flush.remote(), timeout=FLUSH_TIMEOUT_S + 30)
    finally:
        ray.kill(relay)
