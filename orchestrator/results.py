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
from ray.tune.experiment import Trial

from orchestrator.outbox import Outbox
from orchestrator.planning import tuned_params
from orchestrator.relay import finish_relay
from orchestrator.storage import RESULTS_FILE, Storage
from orchestrator.tracking import log_metrics, set_tags
from trainers.config import TrainConfig

FINAL_METRICS = ("loss", "first_loss", "flops", "images_per_s", "probe_top1", "knn_top1", "eval_loss",
                 "resumed_from_step", "step_metrics_lost")
STATUSES = ("finished", "stopped_early", "diverged", "failed")
# How long Tune's loop waits for an ended trial's row to be written: a row is
# what tells a resumed study that the trial ended (see replayed_result), and
# storage answers in milliseconds unless it is away.
ROW_WRITE_WAIT_S = 10.0
# Ray Train's record of a run's checkpointed reports, in the run's storage folder
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
_MLFLOW_END = {"finished": "FINISHED", "stopped_early": "FINISHED", "diverged": "FAILED", "failed": "FAILED"}


def trial_status(last_result: Optional[dict], errored: bool) -> str:
    if errored:
        return "failed"
    status = (last_result or {}).get("status")
    if status in ("finished", "diverged"):
        return status
    # ended without error before its last step: a scheduler stopped it
    return "stopped_early"


def last_result_of(storage: Storage, study: str, trial_id: str, heard: Optional[dict]) -> Optional[dict]:
    """What Tune heard last of a trial; if it heard no step, the last checkpointed
    report of the trial's Train run (its snapshot in storage). With Ray's
    TuneReportCallback, Tune could end a trial before taking its last report (see
    orchestrator/trial.py): a trial that trained to its end then read as stopped
    early at step 0 (2 of 24 trials in a run of window_size_compute)."""
    if heard and "step" in heard:
        return heard
    rel = f"{study}/trials/{trial_id}/{TRAIN_SNAPSHOT}"
    if not storage.exists(rel):
        return heard
    return (storage.read_json(rel).get("latest_checkpoint_result") or {}).get("metrics") or heard


def result_row(trial_id: str, config: dict, last_result: Optional[dict], status: str) -> dict:
    """One row: the trial's identity, its whole resolved config, final metrics, status."""
    last = last_result or {}
    cfg = TrainConfig.model_validate(config["train"])
    row = {"trial_id": trial_id, "cell": config["cell"], "replicate": config["replicate"],
           "role": config.get("role", "tune"), "seed_of": config.get("seed_of"),
           "status": status, **tuned_params(config), **_flat(cfg.resolved()),
           "steps_done": int(last.get("step", 0)), "reason": last.get("reason", "")}
    for k in FINAL_METRICS:
        row[k] = float(last[k]) if k in last else None
    return row


def replayed_result(row: dict) -> Optional[dict]:
    """The last result of an ended trial as its row holds it, for the trial to
    report again instead of training; None for a failed trial, which a resume
    runs again. A study's driver killed after a row was written but before Tune
    saved its state restarts the trial: a trial stopped early would otherwise
    train on to its budget. result_row of it gives back the same row."""
    if row["status"] == "failed":
        return None
    result = {k: row[k] for k in FINAL_METRICS if row.get(k) is not None}
    # trial_status reads an ending without "finished" or "diverged" as stopped early
    status = "running" if row["status"] == "stopped_early" else row["status"]
    return {**result, "step": row["steps_done"], "reason": row["reason"], "status": status}


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

    def write(self, rows: list[dict]) -> None:
        self.storage.write_table(self.rel, pa.Table.from_pylist(rows))


class TrialRecorder(Callback):
    """Writes each ended trial to results.parquet and closes its MLflow run.

    Its writes go through Outboxes (storage, MLflow, the trials' metric
    relays), so an outage never stops the study; `close` says what could not
    be written, and each row counts its step metrics that never reached MLflow. On a
    resumed study it first catches up with what the killed driver left undone:
    rows of trials that ended unrecorded, and MLflow runs left RUNNING; and the
    parent run, ended KILLED by an interrupt, runs again.
    """

    def __init__(self, storage: Storage, study: str, tracking_uri: str, experiment_id: str,
                 parent_run_id: str):
        self.study = study
        self.table = ResultsTable(storage, study)
        self.client = MlflowClient(tracking_uri)
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.lock = threading.Lock()
        self.storage_outbox = Outbox("results store")
        self.tracking_outbox = Outbox("MLflow")
        self.relay_outbox = Outbox("step metrics relays")  # waits for relays, apart from other MLflow calls
        self.unknown_losses: list[str] = []
        self._caught_up = False

    def __getstate__(self):
        # Tune pickles its run config, callbacks included, into the experiment
        # state; a resumed execution attaches fresh callbacks, so keep nothing.
        return {}

    def on_step_begin(self, iteration, trials, **info):
        if not self._caught_up:
            self._caught_up = True
            self._catch_up(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, errored=True)

    def close(self, parent_status: str, timeout_s: float = 300.0) -> list[str]:
        """End the parent run and wait for every write; returns what was never written."""
        lost = [f"MLflow: {w}" for w in self.relay_outbox.drain(timeout_s)] + self.unknown_losses
        self.tracking_outbox.put("end of the study's parent run",
                                 lambda: self.client.set_terminated(self.parent_run_id, parent_status))
        lost += [f"results store: {w}" for w in self.storage_outbox.drain(timeout_s)]
        return lost + [f"MLflow: {w}" for w in self.tracking_outbox.drain(timeout_s)]

    def _catch_up(self, trials: list) -> None:
        ended = {t.trial_id: t for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR)}
        for trial in ended.values():
            if trial.trial_id not in self.table.rows:
                self._record(trial, errored=trial.status == Trial.ERROR)
        known = {t.trial_id for t in trials}
        self.tracking_outbox.put("end of runs left running", lambda: self._end_runs_left_running(known))
        # an interrupted study's parent run was ended KILLED; it goes on now
        self.tracking_outbox.put("parent run reopened",
                                 lambda: self.client.update_run(self.parent_run_id, status="RUNNING"))

    def _end_runs_left_running(self, known: set[str]) -> None:
        """Nested runs still RUNNING after a driver was killed: a trial with a row
        gets its final state; one that Tune never saved (it started just before the
        kill, and will run again as a new trial) is marked KILLED."""
        runs = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}' and attributes.status = 'RUNNING'"))
        for run in runs:
            trial_id = run.data.tags.get("trial_id")
            if trial_id in self.table.rows:
                self._close_run(run.info.run_id, self.table.rows[trial_id])
            elif trial_id not in known:
                set_tags(self.client, run.info.run_id, {"status": "lost",
                         "reason": "the study's driver died before Tune saved this trial; it ran again as another"})
                self.client.set_terminated(run.info.run_id, "KILLED")

    def _record(self, trial, errored: bool) -> None:
        last = last_result_of(self.table.storage, self.study, trial.trial_id, trial.last_result)
        row = result_row(trial.trial_id, trial.config, last, trial_status(last, errored))
        with self.lock:
            self.table.rows[row["trial_id"]] = row
        self._write_rows().wait(ROW_WRITE_WAIT_S)
        self.relay_outbox.put(f"step metrics of trial {trial.trial_id}", lambda: self._finish_relay(row))

    def _write_rows(self) -> threading.Event:
        """Queue a write of every row; returns the event of the results write."""
        with self.lock:
            rows = list(self.table.rows.values())
        self.tracking_outbox.put("study metrics", lambda: self._study_metrics(rows))
        return self.storage_outbox.put(f"{RESULTS_FILE} with {len(rows)} rows", lambda: self.table.write(rows))

    def _finish_relay(self, row: dict) -> None:
        """The count of step metrics that never reached MLflow goes into the trial's
        row; then the trial's run is closed (after its relay opened it, if it could)."""
        try:
            lost = finish_relay(self.study, row["trial_id"])
            with self.lock:  # added to what an ending replayed after a resume counted
                row["step_metrics_lost"] = (row.get("step_metrics_lost") or 0.0) + lost
            self._write_rows()
        except Exception as err:  # the relay died: what it held is gone, and how much is unknown
            self.unknown_losses.append(f"MLflow: step metrics of trial {row['trial_id']} (its relay died: "
                                       f"{type(err).__name__}; how many is unknown)")
        self.tracking_outbox.put(f"end of trial {row['trial_id']}'s run", lambda: self._close_trial_run(row))

    def _close_trial_run(self, row: dict) -> None:
        runs = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.trial_id = '{row['trial_id']}' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'")
        if runs:  # none: the trial failed before it could create its run
            self._close_run(runs[0].info.run_id, row)

    def _close_run(self, run_id: str, row: dict) -> None:
        final = {k: row[k] for k in FINAL_METRICS if row.get(k) is not None}
        log_metrics(self.client, run_id, {f"final_{k}": v for k, v in final.items()}, step=row["steps_done"])
        set_tags(self.client, run_id, {"status": row["status"], "reason": row["reason"]})
        self.client.set_terminated(run_id, _MLFLOW_END[row["status"]])

    def _study_metrics(self, rows: list[dict]) -> None:
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        metrics = {f"trials_{s}": n for s, n in counts.items()}
        metrics["flops_spent"] = sum(r["flops"] or 0.0 for r in rows)
        metrics["step_metrics_lost"] = sum(r.get("step_metrics_lost") or 0.0 for r in rows)
        log_metrics(self.client, self.parent_run_id, metrics, step=len(rows))
