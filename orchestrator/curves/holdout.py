"""Held-out check: does a law fitted without the largest x predict it?"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CurveFitError
from .fit import FitResult, as_inputs, fit_curve, json_number
from .laws import get_law


@dataclass
class HoldoutCheck:
    """Prediction at the held-out x from a fit made without it.

    `interval` is the bootstrap band of the fitted curve there;
    `prediction_interval` also includes trial-to-trial noise (resampled
    residuals, for the mean of the held-out trials), and `inside` says whether
    the actual mean falls in that wider interval.
    """
    x: float | tuple[float, float]  # the held-out x ((N, D) for two-variable laws)
    n_heldout: int  # trials at that x
    predicted: float
    interval: tuple[float, float]
    prediction_interval: tuple[float, float]
    actual: float  # mean y of the held-out trials
    rel_error: float  # (predicted - actual) / |actual|
    inside: bool
    level: float
    fit: FitResult  # the fit without the held-out point

    def to_dict(self) -> dict[str, Any]:
        return {"x": json_number(self.x) if np.isscalar(self.x) else [json_number(v) for v in self.x],
                "n_heldout": self.n_heldout, "predicted": json_number(self.predicted),
                "interval": [json_number(v) for v in self.interval],
                "prediction_interval": [json_number(v) for v in self.prediction_interval],
                "actual": json_number(self.actual), "rel_error": json_number(self.rel_error),
                "inside": self.inside, "level": self.level,
                "params_without_heldout": {k: json_number(v) for k, v in self.fit.params.items()}}


def holdout_check(x, y, law: str, *, bootstrap: int = 1000, seed: int = 0, level: float = 0.95,
                  higher_is_better: bool = False, log_x: bool = False) -> HoldoutCheck:
    """Refit without the largest x (for (N, D) inputs: the largest N·D, i.e. compute).

    All trials at that x are held out. Raises CurveFitError if the remaining
    points cannot support the law.
    """
    inputs = as_inputs(x, get_law(law, log_x).n_inputs)
    y = np.asarray(y, dtype=float)
    size = inputs.prod(1)
    held = size == size.max()
    if held.all():
        raise CurveFitError("holdout needs more than one distinct x")
    kept_x = inputs[~held, 0] if inputs.shape[1] == 1 else inputs[~held]
    fit = fit_curve(kept_x, y[~held], law, bootstrap=bootstrap, seed=seed, level=level,
                    higher_is_better=higher_is_better, log_x=log_x)
    if fit.n_bootstrap == 0:
        raise CurveFitError(f"fitted without the largest x: {fit.interval_note or 'bootstrap=0'}")
    point = inputs[held][:1]
    x_held = float(point[0, 0]) if inputs.shape[1] == 1 else tuple(map(float, point[0]))
    query = point[:, 0] if inputs.shape[1] == 1 else point
    predicted = float(fit.predict(query)[0])
    band = tuple(float(v[0]) for v in fit.predict_interval(query))
    wide = tuple(float(v[0]) for v in fit.predict_interval(query, n_trials=int(held.sum())))
    actual = float(y[held].mean())
    return HoldoutCheck(x=x_held, n_heldout=int(held.sum()), predicted=predicted, interval=band,
                        prediction_interval=wide, actual=actual,
                        rel_error=(predicted - actual) / abs(actual) if actual else float("nan"),
                        inside=bool(wide[0] <= actual <= wide[1]), level=level, fit=fit)
