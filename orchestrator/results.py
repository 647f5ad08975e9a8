"""Trial outcomes: the results table in storage and the final state of each MLflow run.

Runs on the driver as a Tune callback: Tune's view of how a trial ended is the
only one that covers every ending (finished, stopped early by ASHA, diverged,
failed), including trials whose process was stopped from outside.
"""
from __future__ import annotations

import threading
from typing import Optional

import pyarrow as pa
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune import Callback

from orchestrator.storage import Storage
from orchestrator.tracking import log_metrics, set_tags
from trainers.config import TrainConfig

RESULTS_FILE = "results.parquet"
FINAL_METRICS = ("loss", "first_loss", "flops", "images_per_s", "probe_top1", "knn_top1", "eval_loss")
STATUSES = ("finished", "stopped_early", "diverged", "failed")
_MLFLOW_END = {"finished": "FINISHED", "stopped_early": "FINISHED", "diverged": "FAILED", "failed": "FAILED"}


def trial_status(last_result: Optional[dict], errored: bool) -> str:
    if errored:
        return "failed"
    status = (last_result or {}).get("status")
    if status in ("finished", "diverged"):
        return status
    # ended without error before its last step: a scheduler stopped it
    return "stopped_early"


def result_row(trial_id: str, config: dict, last_result: Optional[dict], status: str) -> dict:
    """One row: the trial's identity, its whole resolved config, final metrics, status."""
    last = last_result or {}
    cfg = TrainConfig.model_validate(config["train"])
    tuned = {f"tuned.{k}": v for k, v in config.items() if k not in ("cell", "replicate", "train")}
    row = {"trial_id": trial_id, "cell": config["cell"], "replicate": config["replicate"],
           "status": status, **tuned, **_flat(cfg.resolved()),
           "steps_done": int(last.get("step", 0)), "reason": last.get("reason", "")}
    for k in FINAL_METRICS:
        row[k] = float(last[k]) if k in last else None
    return row


def _flat(d: dict) -> dict:
    """Parquet-friendly config values: sequences as text (e.g. mff_layers "0,2,5")."""
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in d.items()}


class ResultsTable:
    """results.parquet, rewritten whole and atomically after each trial ends."""

    def __init__(self, storage: Storage, study: str):
        self.storage, self.rel = storage, f"{study}/{RESULTS_FILE}"
        self.rows: dict[str, dict] = {}
        if storage.exists(self.rel):
            for row in storage.read_table(self.rel).to_pylist():
                self.rows[row["trial_id"]] = row

    def put(self, row: dict) -> None:
        self.rows[row["trial_id"]] = row
        self.storage.write_table(self.rel, pa.Table.from_pylist(list(self.rows.values())))


class TrialRecorder(Callback):
    """Writes each ended trial to results.parquet and closes its MLflow run."""

    def __init__(self, storage: Storage, study: str, tracking_uri: str, experiment_id: str,
                 parent_run_id: str):
        self.table = ResultsTable(storage, study)
        self.client = MlflowClient(tracking_uri)
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.lock = threading.Lock()

    def __getstate__(self):
        # Tune pickles its run config, callbacks included, into the experiment
        # state; a resumed execution attaches fresh callbacks, so keep nothing.
        return {}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, errored=True)

    def _record(self, trial, errored: bool) -> None:
        status = trial_status(trial.last_result, errored)
        row = result_row(trial.trial_id, trial.config, trial.last_result, status)
        with self.lock:
            self.table.put(row)
            self._close_run(trial.trial_id, row)
            self._study_metrics()

    def _close_run(self, trial_id: str, row: dict) -> None:
        runs = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.trial_id = '{trial_id}' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'")
        if not runs:
            return  # the trial failed before it could create its run
        run_id = runs[0].info.run_id
        final = {k: row[k] for k in FINAL_METRICS if row[k] is not None}
        log_metrics(self.client, run_id, {f"final_{k}": v for k, v in final.items()}, step=row["steps_done"])
        set_tags(self.client, run_id, {"status": row["status"], "reason": row["reason"]})
        self.client.set_terminated(run_id, _MLFLOW_END[row["status"]])

    def _study_metrics(self) -> None:
        rows = list(self.table.rows.values())
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        metrics = {f"trials_{s}": n for s, n in counts.items()}
        metrics["flops_spent"] = sum(r["flops"] or 0.0 for r in rows)
        log_metrics(self.client, self.parent_run_id, metrics, step=len(rows))
