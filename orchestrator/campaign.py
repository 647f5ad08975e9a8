"""Running a study: Ray, Tune with the cell searcher and per-cell ASHA, MLflow, storage.

`start` begins an execution of a study file; `resume` continues one from the
state in storage (Tune restores its trials and the searcher's Optuna studies;
each unfinished trial's Train run resumes from its latest checkpoint).
"""
from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from orchestrator import preflight
from orchestrator.planning import Plan, make_plan
from orchestrator.saved_state import (STATE_FILE, TUNE_FOLDER, check_tune_state, plan_fields, read_state,
                                      study_fields, study_for_resume, tune_trial_ids)
from orchestrator.storage import Storage
from orchestrator.study import Study, StudyError, load_study
from orchestrator.study_lock import StudyLock
from orchestrator.tracking import (check_tracking, default_tracking_uri, experiment_id, git_commit, log_params,
                                   ui_hint)
from orchestrator.trial import TrialContext

# Tune reports every Train report (checkpoints too); only evaluation points carry
# the objective, which is what ASHA and Optuna look at.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def validate_all_profiles(study: Study, path) -> None:
    """Refuse impossible values of every profile before anything starts."""
    for profile in study.profiles:
        make_plan(study, profile, path)


def quiet_ray(log_path: str) -> None:
    """Python log lines (Ray's, Tune's and any library's) go to a file, not to the
    user's terminal. Ray's loggers propagate to the root logger, which writes the
    file: ray.init(configure_logging=False) clears the "ray" logger's handlers,
    and a warning logged then would reach the terminal through logging's last
    resort. MLflow's loggers have their own handler on stderr: a tracking store
    that failed a write (its sqlite file on a full disk) logged a traceback on
    the terminal."""
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    ray_loggers = ("ray", "ray.tune", "ray.train", "ray.data")
    for name in ray_loggers + ("mlflow", "sqlalchemy.engine", "alembic"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        if name in ray_loggers:
            logger.setLevel(logging.INFO)


RAY_NAMESPACE = "mim-scaling"


def start_ray(address: Optional[str], log_path: str) -> None:
    from trainers.ray_session import init_ray

    quiet_ray(log_path)
    # A named namespace: the trials' metric relays are named, detached actors (orchestrator/relay.py)
    init_ray(address, log_to_driver=False, configure_logging=False, namespace=RAY_NAMESPACE)


def choose_profile(study: Study, requested: Optional[str]) -> str:
    """`local` when the cluster has no GPU, `cluster` otherwise, unless asked."""
    if requested:
        return requested
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return "cluster" if has_gpu and "cluster" in study.profiles else "local"


def concurrency(plan: Plan, requested: Optional[int]) -> int:
    """How many trials fit at once on what the cluster has."""
    import ray

    res = ray.cluster_resources()
    per_cpu = max(c.config.workers * c.config.cpus_per_worker for c in plan.cells)
    limit = int(res.get("CPU", 1) // per_cpu)
    if any(c.config.use_gpu for c in plan.cells):
        limit = min(limit, int(res.get("GPU", 0) // max(c.config.workers for c in plan.cells)))
    limit = max(1, min(limit, plan.trials))
    return min(limit, requested) if requested else limit


def driver_resources() -> dict:
    """A trial's own process only drives its Train run, so it takes no CPU (on 2
    CPUs a driver holding one would starve its own workers); Tune needs some
    resource in the request, so it asks for a little memory. On a cluster made
    from infra/cluster.yaml, drivers stay on the on-demand head (its `head_driver`
    resource), so a spot preemption never kills a trial's driver."""
    import ray

    if ray.cluster_resources().get("head_driver", 0) > 0:
        return {"head_driver": 1}
    return {"memory": 64 * 2 ** 20}


def _tuner(plan: Plan, ctx: TrialContext, storage: Storage, callbacks: list, max_concurrent: int,
           restore: bool):
    """The study's Tuner, built from the study file on this disk. A resume builds
    the same Tuner and continues Tune's saved experiment (trials, searcher) in
    storage: unlike Tuner.restore, it does not unpickle the search algorithm and
    callbacks that the first execution saved into storage."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.tune_config import ResumeConfig

    from orchestrator.results import ResultsTable
    from orchestrator.search import CellSearcher, PerCellScheduler
    from orchestrator.trial import RunTrial

    path, fs = storage.ray_storage(ctx.study)
    study = plan.study
    # a resume's searcher forgets trials that neither Tune's state nor the results hold
    known = tune_trial_ids(storage, ctx.study) | set(ResultsTable(storage, ctx.study).rows) if restore else None
    searcher = CellSearcher(plan, known_trials=known)
    tuner = tune.Tuner(
        tune.with_resources(RunTrial(ctx), driver_resources()),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=PerCellScheduler(plan, searcher) if study.early_stopping else FIFOScheduler(),
            num_samples=plan.trials,
            max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER, storage_path=path, storage_filesystem=fs, callbacks=callbacks, verbose=0,
            failure_config=tune.FailureConfig(max_failures=2),
            # Tune's state in storage is what a resume continues from: keep it fresh
            # (the default uploads it every 5 minutes at most).
            sync_config=tune.SyncConfig(sync_period=10),
        ),
    )
    if restore:
        # Tuner.restore would do this after unpickling tuner.pkl from storage
        resume = ResumeConfig(unfinished=ResumeConfig.ResumeType.RESUME, errored=ResumeConfig.ResumeType.RESUME)
        tuner._local_tuner._resume_config = resume
        tuner._local_tuner._is_restored = True
    return tuner


def _open_tracking(study_name: str, storage: Storage, tracking_uri: Optional[str]):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri(storage)  # checked by start before Ray started
    client = MlflowClient(uri)
    artifacts = None
    if uri.startswith("sqlite:") and storage.uri.startswith(("/", ".")) or "://" not in storage.uri:
        artifacts = Path(storage.path("mlartifacts")).as_uri()
    return uri, client, experiment_id(client, study_name, artifacts)


def start(study_path: str, *, profile: Optional[str], storage_uri: str, tracking_uri: Optional[str],
          address: Optional[str], max_concurrent: Optional[int], name: Optional[str],
          console: Console, silence_limit_s: float) -> dict:
    """Run a study file from the start. Returns the study state (see STATE_FILE).

    Every check comes before the first write (the experiment, the parent run,
    study.json): a refused start leaves storage and MLflow as they were."""
    study = load_study(study_path)
    validate_all_profiles(study, study_path)
    if profile and profile not in study.profiles:
        raise StudyError(f"{study_path}: profiles.{profile}: the study declares no {profile!r} profile")
    preflight.check_options(name, storage_uri, address, max_concurrent)
    name = name or study.name
    plan = None
    if profile:  # known before Ray starts, and so is the data its cells read
        plan = make_plan(study, profile, study_path)
        preflight.check_data(plan, study_path)
    storage = Storage(storage_uri)
    storage.check()
    if storage.exists(name, STATE_FILE):
        raise StudyError(f"study {name!r} already exists in {storage_uri}: "
                         f"`resume {name}` continues it, --name starts another")
    check_tracking(tracking_uri or default_tracking_uri(storage))

    log_path = _log_path(name)
    with preflight.joining_ray(address):
        start_ray(address, log_path)
    if plan is None:
        plan = make_plan(study, choose_profile(study, None), study_path)
        preflight.check_data(plan, study_path)
    preflight.check_cluster(plan, storage, address)
    profile = plan.profile
    uri, client, exp_id = _open_tracking(name, storage, tracking_uri)
    # Two `run` of one name at once: the second stops here, before it writes anything.
    with StudyLock(storage, name):
        if storage.exists(name, STATE_FILE):
            raise StudyError(f"study {name!r} was started meanwhile by another `run`: `resume {name}` "
                             f"continues it once that one ends")
        parent = client.create_run(exp_id, run_name=f"{name} ({profile})",
                                   tags={"study": name, "profile": profile, "git_commit": git_commit(),
                                         "question": study.question})
        log_params(client, parent.info.run_id, {
            "study_file": str(study_path), "profile": profile, "cells": len(plan.cells),
            "trials_per_cell": study.trials_per_cell, "replicates": study.replicates, "trials": plan.trials,
            "planned_flops": f"{plan.total_flops:.4g}",
            "objective": f"{study.objective.metric} ({study.objective.mode})",
            "tuned": ",".join(study.tune) or "none",
        })
        state = {"name": name, **study_fields(study, study_path), **plan_fields(plan), "profile": profile,
                 "storage": storage_uri, "tracking_uri": uri, "experiment_id": exp_id,
                 "parent_run_id": parent.info.run_id, "created": time.time(), "trials": plan.trials,
                 "planned_flops": plan.total_flops, "git_commit": git_commit()}
        storage.write_json(f"{name}/{STATE_FILE}", state)
        return _execute(plan, state, storage, client, max_concurrent, console, restore=False,
                        log_path=log_path, silence_limit_s=silence_limit_s)


def resume(name: str, *, storage_uri: str, tracking_uri: Optional[str], address: Optional[str],
           max_concurrent: Optional[int], console: Console, study_path: Optional[str] = None,
           silence_limit_s: float, trust_tune_state: bool = False) -> dict:
    from mlflow.tracking import MlflowClient

    state = read_state(name, storage_uri)
    storage = Storage(storage_uri)
    storage.check()
    if tracking_uri:
        state["tracking_uri"] = tracking_uri
    check_tracking(state["tracking_uri"])
    study, path = study_for_resume(state, study_path)
    plan = make_plan(study, state["profile"], path)
    check_tune_state(storage, name, trust=trust_tune_state)
    with StudyLock(storage, name):
        log_path = _log_path(name)
        start_ray(address, log_path)
        return _execute(plan, state, storage, MlflowClient(state["tracking_uri"]), max_concurrent, console,
                        restore=True, log_path=log_path, silence_limit_s=silence_limit_s)


def _log_path(name: str) -> str:
    """A new log file that only this user can read: it names buckets, hosts and
    configurations, and lives in a shared temporary folder."""
    folder = os.path.join(tempfile.gettempdir(), "mim-studies")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"{name}-{int(time.time())}.log")
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)  # also when it existed already
    return path


def _execute(plan: Plan, state: dict, storage: Storage, client, max_concurrent: Optional[int],
             console: Console, restore: bool, log_path: str, silence_limit_s: float) -> dict:
    from orchestrator.interrupt import InterruptWatch
    from orchestrator.placement_sweeper import PlacementGroupSweeper
    from orchestrator.progress import StudyProgress
    from orchestrator.results import ResultsTable, TrialRecorder
    from orchestrator.storage_guard import StorageGuard
    from orchestrator.watchdog import SilentTrialWatchdog

    ctx = TrialContext(study=state["name"], profile=state["profile"], storage_uri=state["storage"],
                       tracking_uri=state["tracking_uri"], experiment_id=state["experiment_id"],
                       parent_run_id=state["parent_run_id"], git_commit=state["git_commit"])
    done = {tid: row["status"] for tid, row in ResultsTable(storage, ctx.study).rows.items()}
    recorder = TrialRecorder(storage, ctx.study, ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id)
    progress = StudyProgress(plan, ctx.study, console, done=done)
    limit = concurrency(plan, max_concurrent)
    console.print(f"[bold]{ctx.study}[/bold] ({ctx.profile}): {len(plan.cells)} cells x "
                  f"{plan.study.trials_in_cell} trials, {limit} at a time; Ray log: {log_path}")
    console.print(ui_hint(ctx.tracking_uri, ctx.experiment_id), soft_wrap=True)
    guard = StorageGuard(storage, ctx.study)
    watchdog = SilentTrialWatchdog(ctx.study, silence_limit_s, console)
    interrupt = InterruptWatch()
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        _tuner(plan, ctx, storage, [recorder, progress, PlacementGroupSweeper(), guard, watchdog, interrupt],
               limit, restore).fit()
    finally:  # Tune leaves its own handler behind, which would swallow a Ctrl-C while the curves are fitted
        signal.signal(signal.SIGINT, sigint_handler)
    state["interrupted"] = interrupt.interrupted
    guard.check()  # storage that turned read-only after Tune's last step: stop before the last writes
    state["unwritten"] = recorder.close(parent_status="KILLED" if state["interrupted"] else "FINISHED")
    return state
