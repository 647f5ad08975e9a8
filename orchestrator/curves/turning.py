"""Turning point: where an error curve stops falling and turns upward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .fit import FitResult, fit_curve, json_number, quantile_bounds
from .optimise import weighted_lstsq


@dataclass
class TurningPoint:
    """The minimum of a quadratic in log x fitted to the error (1 - y if higher_is_better).

    A quadratic also bends up on a plateau, so `confident` asks the data
    themselves: the error of the points beyond the vertex must rise with
    log x (bootstrap interval of that slope above zero) and the vertex
    interval must lie inside the data range.
    """
    x: float
    ci: tuple[float, float]
    y: float  # fitted y at the turning point (original scale)
    rise_slope: float  # d error / d log x over the points at x >= vertex
    rise_slope_ci: tuple[float, float]
    confident: bool
    fit: FitResult

    def to_dict(self) -> dict[str, Any]:
        return {"x": json_number(self.x), "ci": [json_number(v) for v in self.ci],
                "y": json_number(self.y), "rise_slope": json_number(self.rise_slope),
                "rise_slope_ci": [json_number(v) for v in self.rise_slope_ci],
                "confident": self.confident, "level": self.fit.level}


def _rise_after(x: np.ndarray, error: np.ndarray, bootstrap: int, seed: int,
                level: float) -> tuple[float, tuple[float, float]]:
    """Slope of error on log x and its bootstrap interval (NaN with < 2 distinct x)."""
    nan = float("nan")
    if len(np.unique(x)) < 2:
        return nan, (nan, nan)
    design = np.column_stack([np.ones(len(x)), np.log(x)])
    slope = float(weighted_lstsq(design, error, np.ones((1, len(x))))[0, 1])
    weights = np.random.default_rng(seed).multinomial(len(x), np.full(len(x), 1 / len(x)), size=bootstrap)
    slopes = weighted_lstsq(design, error, weights.astype(float))[:, 1]
    lo, hi = np.nanquantile(slopes, quantile_bounds(level)) if bootstrap else (nan, nan)
    return slope, (float(lo), float(hi))


def find_turning_point(x, y, *, higher_is_better: bool = False, bootstrap: int = 1000,
                       seed: int = 0, level: float = 0.95) -> TurningPoint | None:
    """The turning point if the fitted error has a minimum strictly inside the data range, else None.

    Raises CurveFitError if there are too few points for a quadratic.
    """
    fit = fit_curve(x, y, "quadratic", bootstrap=bootstrap, seed=seed, level=level,
                    higher_is_better=higher_is_better, log_x=True)
    lo_x, hi_x = float(np.min(fit.x)), float(np.max(fit.x))
    if not (fit.vertex_is_optimum and lo_x < fit.vertex < hi_x):
        return None
    beyond = fit.x >= fit.vertex
    error = 1 - fit.y if higher_is_better else fit.y
    slope, slope_ci = _rise_after(fit.x[beyond], error[beyond], bootstrap, seed, level)
    confident = bool(slope_ci[0] > 0 and lo_x <= fit.vertex_ci[0] and fit.vertex_ci[1] <= hi_x)
    return TurningPoint(x=fit.vertex, ci=fit.vertex_ci, y=float(fit.predict([fit.vertex])[0]),
                        rise_slope=slope, rise_slope_ci=slope_ci, confident=confident, fit=fit)
