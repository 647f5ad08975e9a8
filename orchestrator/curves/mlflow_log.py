"""Logging a study's curves to an MLflow run: figures, parameters, and curves as metric series."""
from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping

import numpy as np

from .figures import plot_curve
from .study_curves import GroupCurve, StudyCurve

MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100  # MLflow's log_batch limits
LARGEST_STEP_X = 1e12  # above this, x is divided by a power of ten so steps stay int64

Point = tuple[str, float, int]  # metric key, value, step


def _key(*parts: str) -> str:
    """MLflow keys allow letters, digits, _ - . / space and colon."""
    return ".".join(re.sub(r"[^\w\-./ :]", "_", str(p)) for p in parts)


def step_scale(x_max: float) -> tuple[float, str]:
    """Factor turning x into an integer step, and the suffix that names it in the metric.

    x below 1 (mask ratios): step = round(1000·x), suffix ".x1000"; x above
    1e12 (FLOPs): step = round(x / 10^k), suffix ".x1e-k"; otherwise step = round(x).
    """
    if x_max < 1:
        return 1000.0, ".x1000"
    if x_max > LARGEST_STEP_X:
        k = math.ceil(math.log10(x_max / LARGEST_STEP_X))
        return 10.0**-k, f".x1e-{k}"
    return 1.0, ""


def _series(key: str, xs, ys, factor: float) -> list[Point]:
    """One value per distinct integer step (the first wins), NaN skipped."""
    steps = np.round(np.asarray(xs, float) * factor).astype(np.int64)
    _, first = np.unique(steps, return_index=True)
    return [(key, float(ys[i]), int(steps[i])) for i in sorted(first) if np.isfinite(ys[i])]


def _group_metrics(curve: str, g: GroupCurve) -> list[Point]:
    prefix = (curve, g.group)
    values: dict[str, float] = {}
    fit = g.fit
    if fit is not None:
        for name in fit.param_names:
            values[_key(*prefix, name)] = fit.params[name]
            values[_key(*prefix, f"{name}_ci_low")], values[_key(*prefix, f"{name}_ci_high")] = fit.ci[name]
        diag = fit.diagnostics
        values[_key(*prefix, f"rmse_{diag.space}")] = diag.rmse
        values[_key(*prefix, f"r2_{diag.space}")] = diag.r2
        if fit.vertex is not None:
            values[_key(*prefix, "vertex")] = fit.vertex
            values[_key(*prefix, "vertex_ci_low")], values[_key(*prefix, "vertex_ci_high")] = fit.vertex_ci
        if g.holdout is not None:
            values[_key(*prefix, "holdout_rel_error")] = g.holdout.rel_error
            values[_key(*prefix, "holdout_inside")] = float(g.holdout.inside)
    if g.rollout is not None:
        values[_key(*prefix, "rollout_inside_fraction")] = g.rollout.inside_fraction
        values[_key(*prefix, "rollout_mean_abs_rel_error")] = g.rollout.mean_abs_rel_error
    if fit is not None:
        values[_key(*prefix, "warnings")] = len(fit.diagnostics.warnings)
    if g.turning_point is not None:
        tp = g.turning_point
        values[_key(*prefix, "turning_point")] = tp.x
        values[_key(*prefix, "turning_point_ci_low")], values[_key(*prefix, "turning_point_ci_high")] = tp.ci
    metrics = [(k, float(v), 0) for k, v in values.items() if np.isfinite(v)]
    if g.x.ndim == 1:  # series need one x; the two-variable law has none
        factor, suffix = step_scale(float(g.x.max()))
        metrics += _series(_key(*prefix, "mean") + suffix, g.summary["x"], g.summary["mean"].to_numpy(), factor)
        samples = g.samples()
        for kind in ("fit", "band_low", "band_high"):
            metrics += _series(_key(*prefix, kind) + suffix, samples["x"], samples[kind].to_numpy(), factor)
    return metrics


def _isoflop_metrics(name: str, iso) -> list[tuple[str, float]]:
    """N_opt ~ C^a and D_opt ~ C^b with their intervals, and the held-out budget's errors."""
    values = {}
    for law, fit in (("n_opt", iso.n_opt), ("d_opt", iso.d_opt)):
        if fit is not None:
            values[_key("curve", name, f"{law}_exponent")] = fit.a
            values[_key("curve", name, f"{law}_exponent_ci_low")], values[_key("curve", name, f"{law}_exponent_ci_high")] = fit.a_ci
    if iso.held_out is not None:
        h = iso.held_out.to_dict()
        for k in ("n_rel_error", "y_rel_error"):
            values[_key("curve", name, f"held_out_budget_{k}")] = h[k]
        values[_key("curve", name, "held_out_budget_n_inside")] = float(h["n_inside"])
    return [(k, float(v)) for k, v in values.items() if v is not None and np.isfinite(v)]


def log_curves_to_mlflow(results: Mapping[str, StudyCurve] | Iterable[StudyCurve], client, run_id: str) -> None:
    """Log each curve to the run with an `mlflow.tracking.MlflowClient`.

    - figure: artifact curves/<curve>.png
    - params: curve.<curve>.law / .x / .y / .group_by
    - metrics: curve.<curve>.<group>.<param> with _ci_low/_ci_high, rmse, r2,
      vertex, turning point and holdout results (step 0)
    - series drawn by the MLflow charts: curve.<curve>.<group>.mean (per-x
      mean of trials), .fit, .band_low, .band_high with step = x, or a
      rescaled x named by a suffix (see step_scale), e.g.
      curve.mask.vit_b.fit.x1000 for mask ratios.
    The law fitted to the frontier is logged as group "frontier".
    """
    from mlflow.entities import Metric, Param  # here, so fitting in a notebook does not import mlflow

    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    params: list[Param] = []
    for curve in (results.values() if isinstance(results, Mapping) else results):
        spec = curve.spec
        name = spec.name
        client.log_figure(run_id, plot_curve(curve), f"curves/{name}.png")
        x = spec.x if isinstance(spec.x, str) else ",".join(spec.x)
        params += [Param(_key("curve", name, "law"), spec.law or "none"), Param(_key("curve", name, "x"), x),
                   Param(_key("curve", name, "y"), spec.y),
                   Param(_key("curve", name, "group_by"), ",".join(spec.group_columns) or "none")]
        groups = list(curve.groups.values()) + ([curve.frontier_fit] if curve.frontier_fit else [])
        for g in groups:
            metrics += [Metric(key, value, now, step) for key, value, step in _group_metrics(_key("curve", name), g)]
        if curve.isoflop is not None:
            metrics += [Metric(key, value, now, 0) for key, value in _isoflop_metrics(name, curve.isoflop)]
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
