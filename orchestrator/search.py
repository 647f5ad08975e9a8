"""Tune search and scheduling over grid cells.

OptunaSearch cannot take a grid, and one Optuna study over the whole grid would
cover cells unevenly. CellSearcher keeps one Optuna study per cell and hands
out cells so each gets exactly `trials_per_cell` trials, however many run at
once. Early stopping compares trials within their cell only (a ViT-L trial is
not stopped for trailing a ViT-B one): one ASHA per cell.
"""
from __future__ import annotations

from typing import Any, Optional

import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)  # per-trial lines would flood the progress view
from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray import cloudpickle
from ray.tune.search.optuna import OptunaSearch

from orchestrator.planning import Plan
from orchestrator.study import Study


def optuna_space(study: Study) -> dict[str, Any]:
    space = {}
    for name, p in study.tune.items():
        if p.kind == "log_uniform":
            space[name] = FloatDistribution(p.low, p.high, log=True)
        elif p.kind == "uniform":
            space[name] = FloatDistribution(p.low, p.high)
        elif p.kind == "int":
            space[name] = IntDistribution(p.low, p.high)
        else:
            space[name] = CategoricalDistribution(list(p.values))
    return space


def _sampler(study: Study, seed: int) -> optuna.samplers.BaseSampler:
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # few trials per cell: start TPE after a small random phase
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, max(1, study.trials_per_cell // 2)))


class CellSearcher(Searcher):
    """Suggests {"cell": id, "replicate": k, **tuned, "train": the trial's TrainConfig}
    with exact per-cell quotas."""

    def __init__(self, plan: Plan, seed: int = 0):
        study = plan.study
        super().__init__(metric=study.objective.metric, mode=study.objective.mode)
        self._plan = plan
        self._quota = study.trials_per_cell
        self._cells = [c.id for c in plan.cells]
        self._issued = {c: 0 for c in self._cells}
        self._cost = {c.id: c.flops_per_trial for c in plan.cells}
        self._trial_cell: dict[str, str] = {}
        space = optuna_space(study)
        self._optuna = {
            c: OptunaSearch(space=space, metric=study.objective.metric, mode=study.objective.mode,
                            sampler=_sampler(study, seed + i))
            for i, c in enumerate(self._cells)
        } if space else {}

    def suggest(self, trial_id: str) -> Optional[dict]:
        open_cells = [c for c in self._cells if self._issued[c] < self._quota]
        if not open_cells:
            return Searcher.FINISHED
        # Fewest issued first: cells fill evenly, so a stopped study has a balanced
        # grid. Within a round the costliest cell first: the trials started last are
        # short ones, not a long one left running alone on an idle cluster.
        cell = min(open_cells, key=lambda c: (self._issued[c], -self._cost[c]))
        params = self._optuna[cell].suggest(trial_id) if self._optuna else {}
        replicate = self._issued[cell]
        self._issued[cell] += 1
        self._trial_cell[trial_id] = cell
        train = self._plan.trial_config(cell, params, replicate)
        return {"cell": cell, "replicate": replicate, **params, "train": train.model_dump(mode="json")}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._optuna:
            self._optuna[self._trial_cell[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if self._optuna and trial_id in self._trial_cell:
            self._optuna[self._trial_cell[trial_id]].on_trial_complete(trial_id, result, error)

    def optuna_trials(self, cell: str) -> list:
        """The cell's Optuna history (finished, pruned and failed trials)."""
        return self._optuna[cell]._ot_study.trials if self._optuna else []

    # cloudpickle: the plan holds the study, whose `derive` lives in a study file
    # that is not an importable module.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            cloudpickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(cloudpickle.load(f))


class PerCellScheduler(FIFOScheduler):
    """Routes each trial to its cell's ASHA; trials start in submission order."""

    def __init__(self, plan: Plan):
        super().__init__()
        objective = plan.study.objective
        # rungs at the evaluation points: the first after eval_every_steps, the last at the budget
        self._asha = {
            c.id: AsyncHyperBandScheduler(
                time_attr="step", metric=objective.metric, mode=objective.mode,
                max_t=c.config.steps, grace_period=c.config.eval_every_steps or c.config.steps,
                reduction_factor=2)
            for c in plan.cells
        }

    def _for(self, trial) -> AsyncHyperBandScheduler:
        return self._asha[trial.config["cell"]]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._for(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._for(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_error(tune_controller, trial)
