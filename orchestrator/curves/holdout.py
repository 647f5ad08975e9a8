"""Predictions checked against runs the fit did not see.

The rollout check fits on the smallest x only and predicts the next larger x
in turn (the way a model ladder is used: fit the small runs, predict the one
nobody has paid for yet), reporting each signed error against a prediction
interval that includes the trials' own noise. The held-out check is its last
step: the fit without the largest x, predicting it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CurveFitError
from .fit import FitResult, as_inputs, fit_curve, json_number
from .laws import get_law


@dataclass
class HoldoutCheck:
    """Prediction at a held-out x from a fit made on the smaller x only.

    `interval` is the bootstrap band of the fitted curve there;
    `prediction_interval` also includes trial-to-trial noise (resampled
    residuals, for the mean of the held-out trials), and `inside` says whether
    the actual mean falls in that wider interval.
    """
    x: float | tuple[float, float]  # the held-out x ((N, D) for two-variable laws)
    n_heldout: int  # trials at that x
    n_fitted_x: int  # distinct x the fit saw
    predicted: float
    interval: tuple[float, float]
    prediction_interval: tuple[float, float]
    actual: float  # mean y of the held-out trials
    error: float  # predicted - actual
    rel_error: float  # (predicted - actual) / |actual|
    inside: bool
    level: float
    fit: FitResult  # the fit without the held-out point

    def to_dict(self) -> dict[str, Any]:
        return {"x": json_number(self.x) if np.isscalar(self.x) else [json_number(v) for v in self.x],
                "n_heldout": self.n_heldout, "n_fitted_x": self.n_fitted_x,
                "predicted": json_number(self.predicted),
                "interval": [json_number(v) for v in self.interval],
                "prediction_interval": [json_number(v) for v in self.prediction_interval],
                "actual": json_number(self.actual), "error": json_number(self.error),
                "rel_error": json_number(self.rel_error), "inside": self.inside, "level": self.level,
                "params_without_heldout": {k: json_number(v) for k, v in self.fit.params.items()}}


@dataclass
class Rollout:
    """Each step: fitted on the x up to one value, predicting the next."""
    steps: list[HoldoutCheck]
    skipped: list[str] = field(default_factory=list)  # why the smaller prefixes could not predict

    @property
    def inside_fraction(self) -> float:
        return float(np.mean([s.inside for s in self.steps])) if self.steps else float("nan")

    @property
    def mean_abs_rel_error(self) -> float:
        return float(np.mean([abs(s.rel_error) for s in self.steps])) if self.steps else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps], "skipped": self.skipped,
                "inside_fraction": json_number(self.inside_fraction),
                "mean_abs_rel_error": json_number(self.mean_abs_rel_error)}


def _size(inputs: np.ndarray) -> np.ndarray:
    """x, or N·D (compute) for two-variable laws: what "larger" means."""
    return inputs.prod(1)


def _predict_next(inputs: np.ndarray, y: np.ndarray, fitted: np.ndarray, held: np.ndarray, law: str,
                  **opts) -> HoldoutCheck:
    kept_x = inputs[fitted, 0] if inputs.shape[1] == 1 else inputs[fitted]
    fit = fit_curve(kept_x, y[fitted], law, **opts)
    if fit.n_bootstrap == 0:
        raise CurveFitError(f"fitted on {len(np.unique(_size(inputs[fitted])))} x: "
                            f"{fit.interval_note or 'bootstrap=0'}")
    point = inputs[held][:1]
    x_held = float(point[0, 0]) if inputs.shape[1] == 1 else tuple(map(float, point[0]))
    query = point[:, 0] if inputs.shape[1] == 1 else point
    predicted = float(fit.predict(query)[0])
    band = tuple(float(v[0]) for v in fit.predict_interval(query))
    wide = tuple(float(v[0]) for v in fit.predict_interval(query, n_trials=int(held.sum())))
    actual = float(y[held].mean())
    return HoldoutCheck(x=x_held, n_heldout=int(held.sum()), n_fitted_x=len(np.unique(_size(inputs[fitted]))),
                        predicted=predicted, interval=band, prediction_interval=wide, actual=actual,
                        error=predicted - actual,
                        rel_error=(predicted - actual) / abs(actual) if actual else float("nan"),
                        inside=bool(wide[0] <= actual <= wide[1]), level=opts["level"], fit=fit)


def rollout_check(x, y, law: str, *, bootstrap: int = 1000, seed: int = 0, level: float = 0.95,
                  higher_is_better: bool = False, log_x: bool = False) -> Rollout:
    """Fit on the k smallest distinct x and predict the (k+1)-th, for every k whose
    fit has intervals. Raises CurveFitError when not even the largest x can be
    predicted."""
    inputs = as_inputs(x, get_law(law, log_x).n_inputs)
    y = np.asarray(y, dtype=float)
    size = _size(inputs)
    levels = np.unique(size)
    if len(levels) < 2:
        raise CurveFitError("a rollout needs more than one distinct x")
    opts = dict(bootstrap=bootstrap, seed=seed, level=level, higher_is_better=higher_is_better, log_x=log_x)
    steps, skipped = [], []
    for k in range(1, len(levels)):
        try:
            steps.append(_predict_next(inputs, y, size < levels[k], size == levels[k], law, **opts))
        except CurveFitError as err:
            skipped.append(f"x <= {levels[k - 1]:g}: {err}")
    if not steps:
        raise CurveFitError(skipped[-1])
    return Rollout(steps=steps, skipped=skipped)


def holdout_check(x, y, law: str, **opts) -> HoldoutCheck:
    """Refit without the largest x (for (N, D) inputs: the largest N·D, i.e. compute)
    and predict it. Raises CurveFitError if the remaining points cannot support the law."""
    inputs = as_inputs(x, get_law(law, opts.get("log_x", False)).n_inputs)
    y = np.asarray(y, dtype=float)
    size = _size(inputs)
    held = size == size.max()
    if held.all():
        raise CurveFitError("holdout needs more than one distinct x")
    opts = {"bootstrap": 1000, "seed": 0, "level": 0.95, "higher_is_better": False, "log_x": False, **opts}
    try:
        return _predict_next(inputs, y, ~held, held, law, **opts)
    except CurveFitError as err:
        raise CurveFitError(f"fitted without the largest x: {err}") from None
