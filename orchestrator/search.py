"""Tune search and scheduling over grid cells.

OptunaSearch cannot take a grid, and one Optuna study over the whole grid would
cover cells unevenly. CellSearcher keeps one Optuna study per cell and hands
out cells so each gets exactly `trials_per_cell` trials, however many run at
once. Early stopping compares trials within their cell only (a ViT-L trial is
not stopped for trailing a ViT-B one): one ASHA per cell.

Tune saves the searcher's state but not the scheduler's, and a sampler rebuilt
from its seed would draw again what it drew before: a resume gives each cell's
sampler a stream of its own (seeded by the cell and its history's length) and
replays the history's evaluations into each cell's ASHA.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)  # per-trial lines would flood the progress view
from optuna.distributions import (CategoricalDistribution, FloatDistribution, IntDistribution,
                                  distribution_to_json, json_to_distribution)
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import Searcher

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


def _objective(result: Optional[dict], metric: str) -> Optional[float]:
    """The objective of a Tune result, or None where the result has none: a
    checkpoint between evaluation points, a diverged run's last report."""
    value = (result or {}).get(metric)
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


class CellSearcher(Searcher):
    """Suggests {"cell", "replicate", "role", "seed_of", **tuned, "train"} (see
    planning.TRIAL_KEYS) with exact per-cell quotas, asking and telling one Optuna
    study per cell.

    A cell first gets `trials_per_cell` tuning trials (role "tune"). Once all of
    them have ended, it gets `replicates` seeds of its best finished one (role
    "seed", with that trial's parameters and other seeds): those are the cell's
    point on a curve, so no scheduler stops them. A study that tunes nothing
    runs `trials_per_cell` seeds of each cell from the start.

    Optuna is told how each tuning trial ended: one that trained to its budget is
    COMPLETE with its final objective; one a scheduler stopped early, or that
    diverged, is PRUNED (a divergence reports NaN at its step first, which
    Optuna's TPE ranks below every trial that reached that step); one that
    errored is FAIL. Reports without the objective are not the searcher's business.
    Its state is saved as JSON: restoring it runs no code from storage.
    """

    def __init__(self, plan: Plan, seed: int = 0, known_trials: Optional[set[str]] = None):
        study = plan.study
        # on resume: the trials Tune's saved state or results.parquet hold (see restore)
        self._known = known_trials
        super().__init__(metric=study.objective.metric, mode=study.objective.mode)
        self._plan = plan
        self._seed = seed
        self._quota = study.trials_per_cell
        self._replicates = study.replicates
        self._cells = [c.id for c in plan.cells]
        self._issued = {c: 0 for c in self._cells}  # trials of each cell, tuning and seeds
        self._cost = {c.id: c.flops_per_trial for c in plan.cells}
        self._trial_cell: dict[str, str] = {}
        self._trial_number: dict[str, int] = {}  # Tune trial id -> Optuna trial number in its cell
        self._lost: dict[str, list[int]] = {c: [] for c in self._cells}  # Optuna numbers of lost trials
        self._space = optuna_space(study)
        direction = "maximize" if study.objective.mode == "max" else "minimize"
        self._optuna = {
            c: optuna.create_study(direction=direction, sampler=_sampler(study, self._cell_seed(i, 0)))
            for i, c in enumerate(self._cells)
        } if self._space else {}

    def _cell_seed(self, index: int, history: int) -> int:
        """A fresh run keeps `seed + index`; a resume with `history` trials known
        gets a stream of its own, so it does not draw the configurations again."""
        if history == 0:
            return self._seed + index
        return int(np.random.SeedSequence([self._seed, index, history]).generate_state(1)[0])

    def suggest(self, trial_id: str) -> Optional[dict]:
        tuning = [c for c in self._cells if self._issued[c] < self._quota]
        if tuning:
            # Fewest issued first: cells fill evenly, so a stopped study has a balanced
            # grid. Within a round the costliest cell first: the trials started last are
            # short ones, not a long one left running alone on an idle cluster.
            cell = min(tuning, key=lambda c: (self._issued[c], -self._cost[c]))
            if not self._optuna:
                return self._issue(trial_id, cell, "seed", {})
            trial = self._optuna[cell].ask(self._space)
            self._trial_number[trial_id] = trial.number
            return self._issue(trial_id, cell, "tune", trial.params)
        seeding = [c for c in self._cells if self._issued[c] < self._quota + self._replicates]
        if not seeding:
            return Searcher.FINISHED
        for cell in sorted(seeding, key=lambda c: (self._issued[c], -self._cost[c])):
            if not self._tuning_ended(cell):
                continue
            best = self._best_trial_id(cell)
            if best is None:  # no tuning trial finished: there is no configuration to repeat
                self._issued[cell] = self._quota + self._replicates
                return self.suggest(trial_id)
            params = self._optuna[cell].trials[self._trial_number[best]].params
            return self._issue(trial_id, cell, "seed", params, seed_of=best)
        return None  # seeds wait for their cell's tuning to end; Tune asks again

    def _issue(self, trial_id: str, cell: str, role: str, params: dict, seed_of: Optional[str] = None) -> dict:
        replicate = self._issued[cell]
        self._issued[cell] += 1
        self._trial_cell[trial_id] = cell
        train = self._plan.trial_config(cell, params, replicate)
        return {"cell": cell, "replicate": replicate, "role": role, "seed_of": seed_of, **params,
                "train": train.model_dump(mode="json")}

    def _tuning_ended(self, cell: str) -> bool:
        trials = [t for t in self._optuna[cell].trials if t.number not in self._lost[cell]]
        return len(trials) == self._quota and all(t.state != TrialState.RUNNING for t in trials)

    def _best_trial_id(self, cell: str) -> Optional[str]:
        """The Tune id of the cell's best tuning trial that trained to its budget."""
        trials = self._optuna[cell].trials
        done = {tid: trials[n].value for tid, n in self._trial_number.items()
                if self._trial_cell[tid] == cell and trials[n].state == TrialState.COMPLETE}
        if not done:
            return None
        pick = max if self.mode == "max" else min
        return pick(done, key=done.get)

    def _running(self, trial_id: str) -> Optional[tuple[optuna.Study, int]]:
        """The cell's Optuna study and the trial's number, while Optuna waits for its end."""
        if not self._optuna or trial_id not in self._trial_number:
            return None
        study, number = self._optuna[self._trial_cell[trial_id]], self._trial_number[trial_id]
        if study.trials[number].state != TrialState.RUNNING:
            return None  # told already (a replayed report after a resume)
        return study, number

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value, running = _objective(result, self.metric), self._running(trial_id)
        if value is None or running is None:
            return
        study, number = running
        _report(study, number, value, int(result.get("step", result.get("training_iteration", 0))))

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        running = self._running(trial_id)
        if running is None:
            return
        study, number = running
        status = (result or {}).get("status")
        value = _objective(result, self.metric)
        step = int((result or {}).get("step", 0))
        if error:
            study.tell(number, state=TrialState.FAIL)
        elif status == "finished" and value is not None:
            study.tell(number, value)
        else:
            # Tune hands the report that stopped a trial early to the searcher's end
            # only: keep it, as ASHA recorded it (a resume replays it into ASHA)
            if status == "diverged" or value is not None:
                _report(study, number, float("nan") if value is None else value, step)
            study.tell(number, state=TrialState.PRUNED)

    def optuna_trials(self, cell: str) -> list:
        """The cell's Optuna history (finished, pruned and failed trials)."""
        return self._optuna[cell].trials if self._optuna else []

    def evaluations(self) -> list[tuple[str, str, dict[int, float]]]:
        """(Tune trial id, cell, {step: objective}) of every tuning trial known."""
        return [(tid, self._trial_cell[tid], self._optuna[self._trial_cell[tid]].trials[n].intermediate_values)
                for tid, n in self._trial_number.items()]

    def save(self, checkpoint_path: str) -> None:
        state = {"issued": self._issued, "trial_cell": self._trial_cell, "trial_number": self._trial_number,
                 "lost": self._lost, "optuna": {c: [_trial_json(t) for t in s.trials] for c, s in self._optuna.items()}}
        with open(checkpoint_path, "w") as f:
            json.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        if sorted(state["issued"]) != sorted(self._cells):
            raise ValueError(f"{checkpoint_path}: the saved search is of other cells than this study's")
        self._issued, self._trial_cell = state["issued"], state["trial_cell"]
        self._trial_number = state["trial_number"]
        self._lost.update(state.get("lost", {}))
        for i, cell in enumerate(self._cells):
            trials = state["optuna"].get(cell, [])
            for t in trials:
                self._optuna[cell].add_trial(_trial_from_json(t))
            if cell in self._optuna:
                self._optuna[cell].sampler = _sampler(self._plan.study, self._cell_seed(i, len(trials)))
        if self._known is not None:
            self._forget_lost()

    def _forget_lost(self) -> None:
        """Trials handed out that neither Tune's saved state nor results.parquet
        hold: Tune will never run or end them (its state was saved before them,
        or its write failed while the searcher's went through, as on a full
        disk). Their places are handed out again; Optuna counts them failed."""
        for tid in [t for t in self._trial_cell if t not in self._known]:
            cell = self._trial_cell.pop(tid)
            self._issued[cell] -= 1
            if tid in self._trial_number:
                number = self._trial_number.pop(tid)
                self._lost[cell].append(number)
                if self._optuna[cell].trials[number].state == TrialState.RUNNING:
                    self._optuna[cell].tell(number, state=TrialState.FAIL)


def _report(study: optuna.Study, number: int, value: float, step: int) -> None:
    trial = optuna.Trial(study, study.trials[number]._trial_id)
    if step not in study.trials[number].intermediate_values:  # a replay after a resume reports a step again
        trial.report(value, step)


def _trial_json(t: optuna.trial.FrozenTrial) -> dict:
    return {"state": t.state.name, "value": t.value, "params": t.params,
            "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
            "intermediate": {str(k): v for k, v in t.intermediate_values.items()}}


def _trial_from_json(d: dict) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=TrialState[d["state"]], value=d["value"], params=d["params"],
        distributions={k: json_to_distribution(v) for k, v in d["distributions"].items()},
        intermediate_values={int(k): v for k, v in d["intermediate"].items()})


class PerCellScheduler(FIFOScheduler):
    """Routes each tuning trial to its cell's ASHA; seeds (role "seed") are curve
    points and run to their budget, unseen by ASHA. Trials start in submission order.
    Before its first decision it replays the searcher's evaluations into the
    rungs: after a resume (the searcher restored first) a trial is measured
    against every trial that reached a rung, not only those since."""

    def __init__(self, plan: Plan, searcher: CellSearcher):
        super().__init__()
        self._searcher: Optional[CellSearcher] = searcher
        objective = plan.study.objective
        # rungs at the evaluation points: the first after eval_every_steps, the last at the budget
        self._asha = {
            c.id: AsyncHyperBandScheduler(
                time_attr="step", metric=objective.metric, mode=objective.mode,
                max_t=c.config.steps, grace_period=c.config.eval_every_steps or c.config.steps,
                reduction_factor=2)
            for c in plan.cells
        }

    def _for(self, trial) -> Optional[AsyncHyperBandScheduler]:
        if self._searcher is not None:
            self._replay_history()
        if trial.config.get("role", "tune") != "tune":
            return None
        return self._asha[trial.config["cell"]]

    def _replay_history(self) -> None:
        searcher, self._searcher = self._searcher, None
        metric = searcher.metric
        for tid, cell, values in searcher.evaluations():
            asha, stand_in = self._asha[cell], SimpleNamespace(trial_id=tid)
            asha.on_trial_add(None, stand_in)
            for step in sorted(values):
                asha.on_trial_result(None, stand_in, {"step": step, metric: values[step]})
            asha.on_trial_remove(None, stand_in)

    def on_trial_add(self, tune_controller, trial) -> None:
        if asha := self._for(trial):
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        asha = self._for(trial)
        return asha.on_trial_result(tune_controller, trial, result) if asha else self.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if asha := self._for(trial):
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if asha := self._for(trial):
            asha.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        if asha := self._for(trial):
            asha.on_trial_error(tune_controller, trial)
