"""One Tune trial: a Ray Train run of one configuration, with its nested MLflow run.

The trial function only drives; the Train workers do the work, and the trial's
MLflow run is kept by its relay (orchestrator/relay.py), so training never
waits for the tracking server. Its Train run is named after the trial, so a
restarted trial (a retry, or `resume`) finds its checkpoints and continues from
the latest. A trial restarted after it ended (its row is in results.parquet)
reports that ending again and trains nothing.

The trial's own thread reports the Train run's results to Tune, in order, and
returns only once it reported the last. Ray's TuneReportCallback instead has
Tune's actor take them from a queue of its own; when the Train run ended before
Tune took its last report, Tune either lost that report or, taking it while the
function's end marker sat in its one-slot result queue, blocked for good on
that queue (seen in the test suite: a study that never ended; once in a study
of 24 trials: two finished trials recorded as stopped early at step 0).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

from orchestrator.planning import tuned_params
from orchestrator.relay import TrialRun, start_relay
from orchestrator.results import ResultsTable, replayed_result
from orchestrator.storage import Storage
from orchestrator.system_metrics import SystemMetrics
from trainers.config import TrainConfig
from trainers.launch import build_trainer


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a study execution shares (plain data: it is pickled to Ray)."""

    study: str
    profile: str
    storage_uri: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str


def trial_tags(ctx: TrialContext, config: dict) -> dict:
    return {"study": ctx.study, "profile": ctx.profile, "cell": config["cell"],
            "replicate": config["replicate"], "role": config.get("role", "tune"), "git_commit": ctx.git_commit}


def system_metrics_callbacks(cfg: TrainConfig, relay) -> list:
    """On GPUs, the Train run's system metrics go to the trial's relay."""
    return [SystemMetrics(relay)] if cfg.use_gpu else []


class ForwardReports(UserCallback):
    """Runs in the Train controller: hands each report (rank 0's metrics) to the
    trial's thread, waiting while the one before is still in the queue."""

    def __init__(self, reports: Queue):
        self.reports = reports

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.reports.put(metrics[0])


class _Fit(threading.Thread):
    """trainer.fit() on a thread of its own, keeping its error for the trial's
    thread. A daemon: a trial Tune stops ends with its actor's process."""

    def __init__(self, trainer):
        super().__init__(name="train-fit", daemon=True)
        self.trainer, self.error = trainer, None

    def run(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # re-raised by the trial's thread
            self.error = e


def report_until_fit_ends(trainer_with) -> None:
    """Fit the trainer that `trainer_with(callback)` builds, reporting each of its
    reports to Tune from this thread; return once its last report is reported."""
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    try:
        fit = _Fit(trainer_with(ForwardReports(reports)))
        fit.start()
        while True:
            finished = not fit.is_alive()  # before the queue is read: no report comes after it
            item: Optional[Any] = None
            try:
                item = reports.get(block=not finished, timeout=0.25)
            except Empty:
                if finished:
                    break
            if item is not None:
                tune.report(item)
        if fit.error is not None:
            raise fit.error
    finally:
        reports.shutdown(force=True)  # nothing is left in it to wait for


class RunTrial:
    """The Tune trainable: config: see planning.TRIAL_KEYS, and the tuned parameters."""

    def __init__(self, ctx: TrialContext):
        self.ctx = ctx

    def __call__(self, config: dict) -> None:
        ctx = self.ctx
        trial_id = tune.get_context().get_trial_id()
        storage = Storage(ctx.storage_uri)
        row = ResultsTable(storage, ctx.study).rows.get(trial_id)
        ended = replayed_result(row) if row else None
        if ended is not None:  # the study's driver died after this trial ended, before Tune saved that
            tune.report(ended)
            return
        cfg = TrainConfig.model_validate(config["train"])
        tuned = tuned_params(config)
        run = TrialRun(ctx.experiment_id, ctx.parent_run_id, trial_id, f"{config['cell']} #{config['replicate']}",
                       trial_tags(ctx, config), {**cfg.resolved(), **tuned})
        path, fs = storage.ray_storage(ctx.study, "trials")
        relay = start_relay(ctx.tracking_uri, ctx.study, run)
        report_until_fit_ends(lambda forward: build_trainer(
            cfg, path, trial_id, storage_filesystem=fs, step_sink=relay,
            callbacks=[forward, *system_metrics_callbacks(cfg, relay)]))
