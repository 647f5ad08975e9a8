"""One Tune trial: a Ray Train run of one configuration, with its nested MLflow run.

The trial function only drives; the Train workers do the work, and the trial's
MLflow run is kept by its relay (orchestrator/relay.py), so training never
waits for the tracking server. Its Train run is named after the trial, so a
restarted trial (a retry, or `resume`) finds its checkpoints and continues from
the latest. A trial restarted after it ended (its row is in results.parquet)
reports that ending again and trains nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

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
        trainer = build_trainer(cfg, path, trial_id, storage_filesystem=fs, step_sink=relay,
                                callbacks=[TuneReportCallback(), *system_metrics_callbacks(cfg, relay)])
        trainer.fit()
