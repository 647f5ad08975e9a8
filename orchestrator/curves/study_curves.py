"""Curves of a finished study: declarative specs fitted per group of trials."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import CurveFitError
from .fit import FitResult, fit_curve, json_number
from .frontier import Frontier, compute_frontier
from .holdout import HoldoutCheck, Rollout, rollout_check
from .isoflop import IsoFlopOptimum, IsoFlopSpec, fit_isoflop_optimum
from .laws import POWER_LAWS
from .points import point_trials, tuned_names
from .turning import TurningPoint, find_turning_point

LawName = Literal["power", "saturating_power", "chinchilla", "quadratic"]
NO_GROUP = "all"
FRONTIER_GROUP = "frontier"
FIT_SAMPLES = 100  # points along each fitted curve in figures, parquet and MLflow


class CurveSpec(BaseModel):
    """One curve to fit across a study's finished trials.

    x is a column name, or a (N, D) pair of columns for the chinchilla law.
    log_x (log x axis; for the quadratic, s = log x) defaults to False for
    the quadratic and True otherwise; power laws are always fitted in log x. frontier=True also computes the
    compute-efficient frontier across groups (x is then the compute column)
    and fits the law to the trials on it.
    """
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["curve"] = "curve"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # used as a file and metric name
    x: Union[str, tuple[str, str]]
    y: str
    # a column, or several: one curve per combination (e.g. variant and resolution)
    group_by: Union[str, tuple[str, ...], None] = None
    law: Optional[LawName] = None  # None: points (and frontier) only
    higher_is_better: bool = False
    log_x: Optional[bool] = None  # None is resolved from the law before validation
    frontier: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_log_x(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("log_x") is None:
            data = {**data, "log_x": data.get("law") != "quadratic"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "CurveSpec":
        two_inputs = not isinstance(self.x, str)
        if two_inputs != (self.law == "chinchilla"):
            raise ValueError("x must be a pair of columns (N, D) exactly when law is 'chinchilla'")
        if self.law in POWER_LAWS and not self.log_x:
            raise ValueError(f"{self.law} is fitted in log x: log_x cannot be False")
        if self.frontier and two_inputs:
            raise ValueError("frontier needs a single compute column as x")
        return self

    @property
    def x_columns(self) -> list[str]:
        return [self.x] if isinstance(self.x, str) else list(self.x)

    @property
    def group_columns(self) -> list[str]:
        if self.group_by is None:
            return []
        return [self.group_by] if isinstance(self.group_by, str) else list(self.group_by)


@dataclass
class GroupCurve:
    """One group's trials of a curve and what could be fitted to them."""
    group: str
    x: np.ndarray  # (n,) or (n, 2): one row per trial
    y: np.ndarray
    summary: pd.DataFrame  # per distinct x: x (x2), n, mean, std, min, max of y
    trial_ids: list[str] = field(default_factory=list)  # the trial of each (x, y), where known
    fit: FitResult | None = None
    error: str | None = None  # why the law was refused, if it was
    turning_point: TurningPoint | None = None
    rollout: Rollout | None = None  # fitted on the smaller x, predicting each next one
    notes: list[str] = field(default_factory=list)  # refusals of the optional checks

    @property
    def holdout(self) -> HoldoutCheck | None:
        return self.fit.holdout if self.fit else None

    def samples(self) -> pd.DataFrame:
        """Fitted curve and its confidence band: x (x2), fit, band_low, band_high.

        One-variable laws are sampled along the data's x range; the
        two-variable law at the observed (N, D) pairs.
        """
        if self.fit is None:
            return pd.DataFrame(columns=["x", "x2", "fit", "band_low", "band_high"])
        if self.x.ndim == 2:
            query = np.unique(self.x, axis=0)
            xs, x2 = query[:, 0], query[:, 1]
        else:
            lo, hi = self.x.min(), self.x.max()
            query = xs = np.geomspace(lo, hi, FIT_SAMPLES) if self.fit.log_x else np.linspace(lo, hi, FIT_SAMPLES)
            x2 = np.full(len(xs), np.nan)
        low, high = (self.fit.predict_interval(query) if self.fit.n_bootstrap
                     else (np.full(len(xs), np.nan),) * 2)
        return pd.DataFrame({"x": xs, "x2": x2, "fit": self.fit.predict(query),
                             "band_low": low, "band_high": high})

    def to_dict(self) -> dict[str, Any]:
        rows = [{k: int(v) if k == "n" else json_number(v) for k, v in row.items()}
                for row in self.summary.to_dict("records")]
        x = self.x.reshape(len(self.y), -1)
        points = [{"x": json_number(xi[0]), **({"x2": json_number(xi[1])} if len(xi) > 1 else {}),
                   "y": json_number(yi), "trial_id": tid}
                  for xi, yi, tid in zip(x, self.y, self.trial_ids or [None] * len(self.y))]
        return {"group": self.group, "n_trials": len(self.y), "points": points, "summary": rows,
                "fit": self.fit.to_dict() if self.fit else None, "error": self.error,
                "turning_point": self.turning_point.to_dict() if self.turning_point else None,
                "rollout": self.rollout.to_dict() if self.rollout else None,
                "notes": self.notes}


@dataclass
class StudyCurve:
    spec: CurveSpec
    groups: dict[str, GroupCurve] = field(default_factory=dict)
    frontier: Frontier | None = None
    frontier_fit: GroupCurve | None = None  # the law fitted to the trials on the frontier
    error: str | None = None  # why nothing could be done for this curve
    point_rule: str = ""  # which trials make the points (see points.py)
    isoflop: IsoFlopOptimum | None = None  # a compute-optimal curve's optimum per budget and its laws

    def to_dict(self) -> dict[str, Any]:
        return {"curve": self.spec.name, "spec": self.spec.model_dump(mode="json"), "error": self.error,
                "points_are": self.point_rule,
                "groups": {name: g.to_dict() for name, g in self.groups.items()},
                "frontier": self.frontier.to_dict() if self.frontier else None,
                "frontier_fit": self.frontier_fit.to_dict() if self.frontier_fit else None,
                **({"isoflop": self.isoflop.to_dict()} if self.isoflop else {})}


def _summarise(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    cols = ["x"] if x.ndim == 1 else ["x", "x2"]
    frame = pd.DataFrame(x.reshape(len(y), -1), columns=cols).assign(y=y)
    stats = frame.groupby(cols, sort=True)["y"].agg(["count", "mean", "std", "min", "max"])
    return stats.rename(columns={"count": "n"}).reset_index()


def _fit_group(spec: CurveSpec, group: str, x: np.ndarray, y: np.ndarray, *, bootstrap: int,
               seed: int, level: float, turning: bool, trial_ids: Optional[list[str]] = None) -> GroupCurve:
    """Fit, holdout check and turning point for one group; refusals become text."""
    curve = GroupCurve(group=group, x=x, y=y, summary=_summarise(x, y), trial_ids=list(trial_ids or []))
    if spec.law is None:
        return curve
    opts = dict(bootstrap=bootstrap, seed=seed, level=level,
                higher_is_better=spec.higher_is_better, log_x=spec.log_x)
    try:
        curve.fit = fit_curve(x, y, spec.law, **opts)
    except CurveFitError as err:
        curve.error = str(err)
        return curve
    try:
        curve.rollout = rollout_check(x, y, spec.law, **opts)
        last = curve.rollout.steps[-1]
        if last.n_fitted_x == len(np.unique(x.reshape(len(y), -1).prod(1))) - 1:
            curve.fit.holdout = last  # the rollout's last step predicts the largest x
    except CurveFitError as err:
        curve.notes.append(f"rollout: {err}")
    if turning:
        try:
            curve.turning_point = find_turning_point(x, y, higher_is_better=spec.higher_is_better,
                                                     bootstrap=bootstrap, seed=seed, level=level)
        except CurveFitError as err:
            curve.notes.append(f"turning point: {err}")
    return curve


def _one_key(value: Any) -> tuple:
    """Numbers sort numerically (window 4 before 16), everything else by text."""
    return (0, float(value), "") if isinstance(value, (int, float, np.number)) else (1, 0.0, str(value))


def _group_key(value: Any) -> tuple:
    return tuple(map(_one_key, value)) if isinstance(value, tuple) else (_one_key(value),)


def _group_label(spec: CurveSpec, value: Any) -> str:
    """One column: its value ("vit_base"); several: text values bare, numbers named
    ("lomar w7, img_size=28")."""
    if not isinstance(value, tuple):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return ", ".join(v if isinstance(v, str) else f"{col}={v:g}" if isinstance(v, float) else f"{col}={v}"
                     for col, v in zip(spec.group_columns, value))


def _point_rows(result: StudyCurve, frame: pd.DataFrame, objective: tuple[str, str]) -> pd.DataFrame | None:
    """The rows of the table that make the curve's points; None, with the curve's
    error set, where there are none."""
    spec = result.spec
    needed = spec.x_columns + [spec.y] + spec.group_columns
    # the objective picks a cell's best configuration, where anything was tuned
    missing = [c for c in needed + [objective[0]] * bool(tuned_names(frame)) if c not in frame.columns]
    if missing:
        result.error = f"columns not in the table: {', '.join(missing)}"
        return None
    rows, result.point_rule = point_trials(frame, spec, *objective)
    rows = rows.dropna(subset=needed)
    if rows.empty:
        result.error = "no finished trials with these columns"
        return None
    return rows


def _fit_groups(result: StudyCurve, rows: pd.DataFrame, *, bootstrap: int, seed: int,
                level: float) -> dict[str, tuple[Any, pd.DataFrame]]:
    """Fit every group of the curve; returns each group's value and rows by its label."""
    spec = result.spec
    turning = spec.law in POWER_LAWS and isinstance(spec.x, str)
    by = spec.group_columns[0] if isinstance(spec.group_by, str) else spec.group_columns
    parts = rows.groupby(by, sort=False) if spec.group_by else [(NO_GROUP, rows)]
    groups = {}
    for value, part in sorted(parts, key=lambda item: _group_key(item[0])):
        x = part[spec.x_columns].to_numpy(float)
        label = _group_label(spec, value)
        groups[label] = value, part
        result.groups[label] = _fit_group(
            spec, label, x[:, 0] if isinstance(spec.x, str) else x, part[spec.y].to_numpy(float),
            bootstrap=bootstrap, seed=seed, level=level, turning=turning,
            trial_ids=part["trial_id"].astype(str).tolist() if "trial_id" in part else None)
    return groups


def _fit_one(spec: CurveSpec, frame: pd.DataFrame, objective: tuple[str, str], *, bootstrap: int,
             seed: int, level: float) -> StudyCurve:
    result = StudyCurve(spec=spec)
    rows = _point_rows(result, frame, objective)
    if rows is not None:
        _fit_groups(result, rows, bootstrap=bootstrap, seed=seed, level=level)
        if spec.frontier:
            _add_frontier(result, bootstrap=bootstrap, seed=seed, level=level)
    return result


def _add_frontier(result: StudyCurve, *, bootstrap: int, seed: int, level: float) -> None:
    """Frontier over per-x means (a single lucky trial should not define it), then its fit."""
    spec = result.spec
    means = pd.concat([g.summary.assign(group=name) for name, g in result.groups.items()])
    result.frontier = compute_frontier(means["x"], means["mean"], means["group"],
                                       higher_is_better=spec.higher_is_better)
    if spec.law is None:
        return
    on_frontier = {(p.group, p.compute) for p in result.frontier.points}
    keep = {name: np.array([(name, v) in on_frontier for v in g.x]) for name, g in result.groups.items()}
    x = np.concatenate([g.x[keep[name]] for name, g in result.groups.items()])
    y = np.concatenate([g.y[keep[name]] for name, g in result.groups.items()])
    result.frontier_fit = _fit_group(spec, FRONTIER_GROUP, x, y, bootstrap=bootstrap, seed=seed,
                                     level=level, turning=False)


def _fit_isoflop(spec: IsoFlopSpec, frame: pd.DataFrame, objective: tuple[str, str], **opts) -> StudyCurve:
    curve = StudyCurve(spec=spec.parabolas())
    rows = _point_rows(curve, frame, objective)
    if rows is not None:
        budgets = _fit_groups(curve, rows, **opts)
        curve.isoflop = fit_isoflop_optimum(curve, rows, budgets, spec, **opts)
    return curve


def fit_study_curves(table, specs: list[CurveSpec | IsoFlopSpec], objective: tuple[str, str], *, bootstrap: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict[str, StudyCurve]:
    """Fit every spec to the points of `table` (pandas DataFrame or pyarrow Table).

    One row per trial. `objective` (metric, "min" or "max") is the study's: it
    picks each cell's best configuration, whose trials make the cell's points
    (see points.py; only trials that trained to their budget). Repeated trials
    at the same x are all fitted; per-x mean and spread are in each group's
    `summary`, and each point names its trial. A refused fit is recorded as
    text in its group and never stops the other groups or curves.
    """
    frame = table if isinstance(table, pd.DataFrame) else table.to_pandas()
    if "status" not in frame.columns:
        raise ValueError("the trials table needs a 'status' column")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"curve names must be unique: {names}")
    opts = dict(bootstrap=bootstrap, seed=seed, level=level)
    return {spec.name: (_fit_isoflop if isinstance(spec, IsoFlopSpec) else _fit_one)(spec, frame, objective, **opts)
            for spec in specs}


def spec_from_dict(data: dict) -> CurveSpec | IsoFlopSpec:
    """A curve spec saved as JSON (study.json), of whichever kind it is."""
    return (IsoFlopSpec if data.get("kind") == "isoflop" else CurveSpec).model_validate(data)
