"""The isoFLOP analysis of a compute-optimal study (Hoffmann et al. 2022, approach 2).

At each FLOP budget, models from small to large are trained on as many images
as the budget buys; a parabola in log model size per budget (the study's
ordinary per-group quadratic) has its vertex at the budget's optimal size. The
optimal size N_opt and the images it sees D_opt are then fitted as power laws
of compute, with intervals carried from every budget's vertex uncertainty,
and the law fitted on the smaller budgets predicts the largest one, checked
against that budget's own parabola. The literature's warnings are guards
here: a budget without an interior minimum is left out of the laws, and one
whose optimum sits at the edge of its grid is flagged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from .errors import CurveFitError
from .fit import json_number, quantile_bounds

EDGE_SHARE = 0.15  # an optimum within this share of the log-size range from an end is "at the edge"


class IsoFlopSpec(BaseModel):
    """A compute-optimal curve: `y` against model size per budget, and the optimum
    as a function of compute. Columns: `size` (N), `data` (D), `budget` (the
    budget each run was sized to), `compute` (the FLOPs it spent)."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["isoflop"] = "isoflop"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    y: str = "eval_loss"
    size: str = "encoder_params"
    data: str = "images_seen"
    budget: str = "flops_budget"
    compute: str = "flops"
    higher_is_better: bool = False

    def parabolas(self):
        """The per-budget curves: y against log size, one quadratic per budget."""
        from .study_curves import CurveSpec

        return CurveSpec(name=self.name, x=self.size, y=self.y, group_by=self.budget, law="quadratic",
                         log_x=True, higher_is_better=self.higher_is_better)


@dataclass
class BudgetOptimum:
    budget: float
    compute: float  # mean FLOPs its runs spent
    n_opt: float
    n_opt_ci: tuple[float, float]
    d_opt: float  # images seen at n_opt, interpolated in log space between the runs
    y_opt: float
    flags: list[str] = field(default_factory=list)
    used: bool = True  # enters the laws
    n_samples: np.ndarray = field(default=None, repr=False)  # bootstrap vertices
    d_samples: np.ndarray = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": json_number(self.budget), "compute": json_number(self.compute),
                "n_opt": json_number(self.n_opt), "n_opt_ci": [json_number(v) for v in self.n_opt_ci],
                "d_opt": json_number(self.d_opt), "y_opt": json_number(self.y_opt),
                "flags": self.flags, "used": self.used}


@dataclass
class PowerOfCompute:
    """quantity = k · C^a, fitted in log-log to the budgets' optima."""
    k: float
    a: float
    a_ci: tuple[float, float]
    samples: np.ndarray = field(repr=False)  # (B, 2): log k, a per bootstrap draw

    def predict(self, compute) -> np.ndarray:
        return self.k * np.asarray(compute, float) ** self.a

    def predict_interval(self, compute, level: float) -> tuple[np.ndarray, np.ndarray]:
        lo_q, hi_q = quantile_bounds(level)
        logc = np.log(np.asarray(compute, float))
        draws = self.samples[:, :1] + self.samples[:, 1:] * logc[None]
        lo, hi = np.nanquantile(draws, [lo_q, hi_q], axis=0)
        return np.exp(lo), np.exp(hi)

    def to_dict(self) -> dict[str, Any]:
        return {"k": json_number(self.k), "a": json_number(self.a), "a_ci": [json_number(v) for v in self.a_ci]}


@dataclass
class HeldOutBudget:
    """The laws fitted without the largest budget, predicting it. The interval of
    N_opt carries both the law's uncertainty and that of the held-out budget's own
    vertex; y_opt is predicted by the two-variable law fitted to the smaller
    budgets' runs, at the predicted optimum, with the trials' noise."""
    budget: float
    predicted_n_opt: float
    n_opt_interval: tuple[float, float]
    actual_n_opt: float
    predicted_y_opt: float
    y_opt_interval: tuple[float, float]
    actual_y_opt: float

    @property
    def n_inside(self) -> bool:
        return self.n_opt_interval[0] <= self.actual_n_opt <= self.n_opt_interval[1]

    @property
    def y_inside(self) -> bool:
        return self.y_opt_interval[0] <= self.actual_y_opt <= self.y_opt_interval[1]

    def to_dict(self) -> dict[str, Any]:
        return {"budget": json_number(self.budget), "predicted_n_opt": json_number(self.predicted_n_opt),
                "n_opt_interval": [json_number(v) for v in self.n_opt_interval],
                "actual_n_opt": json_number(self.actual_n_opt), "n_inside": self.n_inside,
                "n_rel_error": json_number(self.predicted_n_opt / self.actual_n_opt - 1),
                "predicted_y_opt": json_number(self.predicted_y_opt),
                "y_opt_interval": [json_number(v) for v in self.y_opt_interval],
                "actual_y_opt": json_number(self.actual_y_opt), "y_inside": self.y_inside,
                "y_rel_error": json_number(self.predicted_y_opt / self.actual_y_opt - 1)}


@dataclass
class IsoFlopOptimum:
    budgets: list[BudgetOptimum]
    level: float
    n_opt: Optional[PowerOfCompute] = None
    d_opt: Optional[PowerOfCompute] = None
    held_out: Optional[HeldOutBudget] = None
    two_variable: Optional[dict] = None  # the chinchilla law on every run, as fit_curve's summary
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"budgets": [b.to_dict() for b in self.budgets], "level": self.level,
                "n_opt_law": self.n_opt.to_dict() if self.n_opt else None,
                "d_opt_law": self.d_opt.to_dict() if self.d_opt else None,
                "held_out_budget": self.held_out.to_dict() if self.held_out else None,
                "two_variable": self.two_variable, "notes": self.notes}


def _vertex_samples(fit) -> np.ndarray:
    """Each bootstrap draw's vertex, in log size (s = log x for the quadratic)."""
    _, b, c = fit.bootstrap_params.T
    with np.errstate(divide="ignore", invalid="ignore"):
        return -b / (2 * c)


def _budget_optimum(budget: float, group, part: pd.DataFrame, spec: IsoFlopSpec) -> BudgetOptimum:
    fit = group.fit
    log_n = np.log(part[spec.size].to_numpy(float))
    log_d = np.log(part[spec.data].to_numpy(float))
    order = np.argsort(log_n)
    with np.errstate(over="ignore"):  # a nearly flat resample's vertex is far out: inf
        s = _vertex_samples(fit)
        n_samples = np.exp(s)
    d = np.exp(np.interp(s, log_n[order], log_d[order], left=np.nan, right=np.nan))
    v = np.log(fit.vertex) if fit.vertex and fit.vertex > 0 else np.nan
    opt = BudgetOptimum(
        budget=budget, compute=float(part[spec.compute].mean()), n_opt=float(np.exp(v)),
        n_opt_ci=tuple(map(float, fit.vertex_ci)),
        d_opt=float(np.exp(np.interp(v, log_n[order], log_d[order]))), y_opt=float(fit.predict([np.exp(v)])[0]),
        n_samples=n_samples, d_samples=d)
    lo, hi = log_n.min(), log_n.max()
    if not fit.vertex_is_optimum or not lo <= v <= hi:
        opt.flags.append("no interior minimum: the runs do not bracket this budget's optimum; "
                         "left out of the laws (add sizes on the side it falls)")
        opt.used = False
    elif min(v - lo, hi - v) < EDGE_SHARE * (hi - lo) or not lo <= np.log(opt.n_opt_ci[0]) <= np.log(opt.n_opt_ci[1]) <= hi:
        side = "smaller" if v - lo < hi - v else "larger"
        opt.flags.append(f"grid not centred on the optimum: it sits near the {side} sizes; "
                         f"add {side} models at this budget")
    return opt


def _power_of_compute(compute: np.ndarray, samples: np.ndarray, point: np.ndarray,
                      level: float) -> PowerOfCompute:
    """log q = log k + a log C through the budgets' optima; the interval of (k, a)
    from refitting each joint draw of the optima (independent bootstraps per budget)."""
    logc = np.log(compute)
    design = np.column_stack([np.ones_like(logc), logc])
    (logk, a), *_ = np.linalg.lstsq(design, np.log(point), rcond=None)
    logs = np.log(samples)  # (budgets, B)
    ok = np.isfinite(logs).all(0)
    draws = np.linalg.lstsq(design, logs[:, ok], rcond=None)[0].T  # (B', 2)
    lo_q, hi_q = quantile_bounds(level)
    a_ci = tuple(map(float, np.quantile(draws[:, 1], [lo_q, hi_q])))
    return PowerOfCompute(k=float(np.exp(logk)), a=float(a), a_ci=a_ci, samples=draws)


def _laws(used: list[BudgetOptimum], level: float) -> tuple[PowerOfCompute, PowerOfCompute]:
    compute = np.array([b.compute for b in used])
    n = _power_of_compute(compute, np.stack([b.n_samples for b in used]), np.array([b.n_opt for b in used]), level)
    d = _power_of_compute(compute, np.stack([b.d_samples for b in used]), np.array([b.d_opt for b in used]), level)
    return n, d


def _two_variable(rows: pd.DataFrame, spec: IsoFlopSpec, **opts):
    from .fit import fit_curve

    rows = rows.dropna(subset=[spec.size, spec.data, spec.y])
    return fit_curve(rows[[spec.size, spec.data]].to_numpy(float), rows[spec.y].to_numpy(float), "chinchilla",
                     higher_is_better=spec.higher_is_better, **opts)


def _held_out(used: list[BudgetOptimum], frame: pd.DataFrame, spec: IsoFlopSpec, level: float,
              **opts) -> HeldOutBudget:
    *smaller, largest = used
    n_law, d_law = _laws(smaller, level)
    c = largest.compute
    logc = np.log(c)
    pred = n_law.samples[:, 0] + n_law.samples[:, 1] * logc  # log N_opt draws of the law
    own = np.log(largest.n_samples[np.isfinite(largest.n_samples) & (largest.n_samples > 0)])
    k = min(len(pred), len(own))
    spread = pred[:k] + (own[:k] - np.log(largest.n_opt))  # both uncertainties
    lo_q, hi_q = quantile_bounds(level)
    n_interval = tuple(float(v) for v in np.exp(np.quantile(spread, [lo_q, hi_q])))
    n_pred, d_pred = float(n_law.predict(c)), float(d_law.predict(c))
    fit = _two_variable(frame[frame[spec.budget] != largest.budget], spec, level=level, **opts)
    y_lo, y_hi = fit.predict_interval(np.array([[n_pred, d_pred]]), n_trials=1)
    return HeldOutBudget(budget=largest.budget, predicted_n_opt=n_pred, n_opt_interval=n_interval,
                         actual_n_opt=largest.n_opt, predicted_y_opt=float(fit.predict(np.array([[n_pred, d_pred]]))[0]),
                         y_opt_interval=(float(y_lo[0]), float(y_hi[0])), actual_y_opt=largest.y_opt)


def fit_isoflop_optimum(curve, frame: pd.DataFrame, budgets: dict[str, tuple[float, pd.DataFrame]],
                        spec: IsoFlopSpec, *, bootstrap: int, seed: int, level: float) -> IsoFlopOptimum:
    """The optimum per budget and its laws, from a fitted per-budget curve; `budgets`
    gives each of its groups' budget and rows by the group's label."""
    result = IsoFlopOptimum(budgets=[], level=level)
    for label, group in curve.groups.items():
        if group.fit is None or group.fit.n_bootstrap == 0:
            result.notes.append(f"budget {label}: no parabola with an interval ({group.error or group.fit.interval_note})")
            continue
        budget, part = budgets[label]
        result.budgets.append(_budget_optimum(float(budget), group, part, spec))
    result.budgets.sort(key=lambda b: b.compute)
    used = [b for b in result.budgets if b.used]
    if len(used) >= 2:
        result.n_opt, result.d_opt = _laws(used, level)
    else:
        result.notes.append(f"{len(used)} budget(s) with an interior minimum: no law of compute")
    opts = dict(bootstrap=bootstrap, seed=seed)
    if len(used) >= 3:
        try:
            result.held_out = _held_out(used, frame, spec, level, **opts)
        except CurveFitError as err:
            result.notes.append(f"held-out budget: {err}")
    else:
        result.notes.append("fewer than 3 budgets with an interior minimum: no held-out budget check")
    try:
        fit = _two_variable(frame, spec, level=level, **opts)
        result.two_variable = {"params": {k: json_number(v) for k, v in fit.params.items()},
                               "ci": {k: [json_number(a), json_number(b)] for k, (a, b) in fit.ci.items()},
                               "n_points": fit.n_points, "warnings": fit.diagnostics.warnings}
    except CurveFitError as err:
        result.notes.append(f"two-variable law: {err}")
    return result
