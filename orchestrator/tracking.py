"""MLflow: an experiment per study, a parent run per execution, a nested run per trial."""
from __future__ import annotations

import logging
import os
import subprocess
import urllib.request
from urllib.parse import urlsplit
from typing import Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

# MLflow's client retries an unreachable server for minutes, each try waiting up to
# 120 s: a stopped server would stall whoever calls it. Our calls go through an
# Outbox (orchestrator/outbox.py), which retries in the background, so each try
# here is kept short.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
# Ending a run prints its URL on stdout, through the study's live view.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# A new sqlite store logs "Creating initial MLflow database tables..." on the terminal,
# before a refusal's one line or the study's live view.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

# MLflow caps a param value at 6000 characters and a batch at 100 params.
_PARAM_BATCH = 100


class TrackingError(RuntimeError):
    pass


def default_tracking_uri(storage) -> str:
    """A sqlite file beside the results when storage is local; else an mlruns folder here."""
    from pyarrow.fs import LocalFileSystem

    if isinstance(storage.fs, LocalFileSystem):
        return f"sqlite:///{storage.path('mlflow.db')}"
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_tracking(uri: str) -> None:
    """Fail before any trial runs if the tracking server cannot be reached, or if
    its URI holds credentials (they belong in MLflow's own variables, which are
    never recorded).

    An HTTP server is asked for /health with a short timeout first: MLflow's
    client retries an unreachable server for minutes before it gives up.
    """
    parts = urlsplit(uri)
    if parts.password or (parts.username and parts.scheme in ("http", "https")):
        shown = parts._replace(netloc=f"***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")).geturl()
        raise TrackingError(f"tracking {shown}: credentials in the URI would be recorded (study.json, logs); "
                            f"give them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                            f"(or MLFLOW_TRACKING_TOKEN) instead")
    try:
        if uri.startswith(("http://", "https://")):
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).read()
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # MLflow raises many kinds; all mean the same here
        raise TrackingError(f"tracking {uri} is unreachable: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}") from None


def experiment_id(client: MlflowClient, name: str, artifact_location: Optional[str] = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # The kind makes the UI of earlier MLflow 3 releases (3.3 was checked), which a
    # tracking server may run, open on runs and charts, not on GenAI traces; later
    # UIs ignore it (see experiment_url).
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def experiment_url(tracking_uri: str, exp_id: str) -> str:
    """The experiment's runs table in MLflow's UI: on the tracking server, or where
    `mlflow ui` serves a local store by default.

    MLflow 3.17's UI opens an experiment in the view its GenAI / Model training
    toggle last showed in that browser (GenAI at first), whatever the experiment's
    tags say; a link that names the view (`workflowType`) opens on the runs."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def ui_hint(tracking_uri: str, exp_id: str) -> str:
    """How to look at a study in MLflow's UI, in one line."""
    url = experiment_url(tracking_uri, exp_id)
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {url}"
    return f"MLflow: `mlflow ui --backend-store-uri {tracking_uri}`, then {url}"


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), _PARAM_BATCH):
        client.log_batch(run_id, params=items[i:i + _PARAM_BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int = 0) -> None:
    import time

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)])


def trial_run(client: MlflowClient, exp_id: str, parent_run_id: str, trial_id: str,
              run_name: str, tags: dict) -> tuple[str, bool]:
    """The nested run of a trial: found again when the trial restarts. Returns (run id, created)."""
    found = client.search_runs([exp_id], filter_string=f"tags.trial_id = '{trial_id}' and "
                               f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'", max_results=1)
    if found:
        return found[0].info.run_id, False
    all_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: run_name, "trial_id": trial_id, **tags}
    # tag values must be strings: a REST tracking server refuses others (e.g. the int replicate)
    run = client.create_run(exp_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name)
    return run.info.run_id, True


def set_tags(client: MlflowClient, run_id: str, tags: dict) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
