"""A study's results in a notebook: the trials table and its fitted curves, from
any storage URI, without Ray.

    from orchestrator import load_study_results
    results = load_study_results("seq_len_scaling", "s3://bucket/studies")
    results.trials                                   # results.parquet, one row per trial
    fit = results.fit("probe_error_vs_seq_len", "vit_b_standin")
    fit.predict([1024]), fit.predict_interval([1024])

It reads only data (study.json and results.parquet): the curves are fitted here,
on first use, with the specs and objective saved in study.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import pandas as pd

from orchestrator.curves import FitResult, StudyCurve, fit_study_curves
from orchestrator.saved_state import curves_of, objective_of, read_state
from orchestrator.storage import RESULTS_FILE, Storage
from orchestrator.study import StudyError


@dataclass
class StudyResults:
    name: str
    state: dict  # study.json
    trials: pd.DataFrame
    bootstrap: int = 1000

    @cached_property
    def curves(self) -> dict[str, StudyCurve]:
        """Each curve by name, fitted on first use; `.groups[label].fit` is a
        FitResult (None where the law was refused, the reason in `.groups[label].error`)."""
        objective = objective_of(self.state)
        return fit_study_curves(self.trials, curves_of(self.state), (objective.metric, objective.mode),
                                bootstrap=self.bootstrap, seed=0)

    def fit(self, curve: str, group: Optional[str] = None) -> FitResult:
        """The fitted law of one curve's group (the group may be left out when
        there is only one), with predict(x) and predict_interval(x)."""
        if curve not in self.curves:
            raise KeyError(f"no curve {curve!r} in {self.name}: {', '.join(self.curves) or 'none declared'}")
        groups = self.curves[curve].groups
        if group is None and len(groups) == 1:
            group = next(iter(groups))
        if group not in groups:
            raise KeyError(f"curve {curve!r} has no group {group!r}: {', '.join(groups) or 'none fitted'}")
        found = groups[group]
        if found.fit is None:
            raise ValueError(f"{curve}, group {group}: not fitted: {found.error or 'the curve has no law'}")
        return found.fit


def load_study_results(name: str, storage: str = "runs", bootstrap: int = 1000) -> StudyResults:
    """The study `name` kept at `storage` (a local folder or s3://bucket/prefix)."""
    state = read_state(name, storage)
    store = Storage(storage)
    if not store.exists(name, RESULTS_FILE):
        raise StudyError(f"study {name!r} has no {RESULTS_FILE} yet in {storage}: no trial has ended")
    trials = store.read_table(f"{name}/{RESULTS_FILE}").to_pandas()
    return StudyResults(name, state, trials, bootstrap)
