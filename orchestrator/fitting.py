"""A study's curves, fitted from results.parquet alone: into storage and onto the
study's parent MLflow run. `run` and `resume` call it at their end; `fit NAME`
calls it on its own."""
from __future__ import annotations

import numpy as np
from mlflow.tracking import MlflowClient
from rich.console import Console

from orchestrator.curves import fit_study_curves, log_curves_to_mlflow, write_curve_outputs
from orchestrator.results import RESULTS_FILE
from orchestrator.saved_state import curves_of, objective_of
from orchestrator.storage import Storage
from orchestrator.study import StudyError


def _interval(lo: float, hi: float) -> str:
    return f"[{lo:.4g}, {hi:.4g}]"


def fit_study(state: dict, storage_uri: str, console: Console, bootstrap: int = 1000) -> dict:
    specs = curves_of(state)
    name = state["name"]
    if not specs:
        console.print(f"{name}: the study declares no curves to fit")
        return {}
    storage = Storage(storage_uri)
    if not storage.exists(name, RESULTS_FILE):
        raise StudyError(f"study {name!r} has no {RESULTS_FILE} yet in {storage_uri}: no trial has ended")
    table = storage.read_table(f"{name}/{RESULTS_FILE}")
    objective = objective_of(state)
    curves = fit_study_curves(table, specs, (objective.metric, objective.mode), bootstrap=bootstrap, seed=0)
    written = write_curve_outputs(curves, storage.path(name, "curves"), filesystem=storage.write_fs)
    log_curves_to_mlflow(curves, MlflowClient(state["tracking_uri"]), state["parent_run_id"])
    for curve in curves.values():
        _print_curve(curve, console)
    console.print(f"curves: {len(written)} files in {storage_uri}/{name}/curves, figures on MLflow run "
                  f"{state['parent_run_id']}")
    return curves


def _print_isoflop(iso, spec, console: Console) -> None:
    for b in iso.budgets:
        console.print(f"    budget {b.budget:.3g} FLOPs: optimal {spec.x} {b.n_opt:.4g} {_interval(*b.n_opt_ci)}, "
                      f"{b.d_opt:.4g} images" + "".join(f"\n      [yellow]{f}[/yellow]" for f in b.flags))
    for law, fit in (("optimal size", iso.n_opt), ("images seen", iso.d_opt)):
        if fit is not None:
            console.print(f"  {law} ~ C^{fit.a:.3g} {_interval(*fit.a_ci)}")
    if (h := iso.held_out) is not None:
        console.print(f"  largest budget {h.budget:.3g} predicted from the smaller: optimal size {h.predicted_n_opt:.4g} "
                      f"{_interval(*h.n_opt_interval)} vs {h.actual_n_opt:.4g} "
                      f"({'inside' if h.n_inside else 'OUTSIDE'}); {spec.y} at it {h.predicted_y_opt:.4g} "
                      f"{_interval(*h.y_opt_interval)} vs {h.actual_y_opt:.4g} ({'inside' if h.y_inside else 'OUTSIDE'})")
    if iso.two_variable:
        params = ", ".join(f"{k}={v:.4g}" for k, v in iso.two_variable["params"].items() if v is not None)
        console.print(f"  two-variable law on every run: {params}")
    for note in iso.notes:
        console.print(f"  {note}")


def _print_curve(curve, console: Console) -> None:
    spec = curve.spec
    console.print(f"[bold]{spec.name}[/bold]: {spec.y} vs {spec.x}"
                  + (f" by {', '.join(spec.group_columns)}" if spec.group_by else "")
                  + (f", law {spec.law}" if spec.law else ""))
    if curve.error:
        console.print(f"  {curve.error}")
    for g in curve.groups.values():
        if g.fit is None:
            console.print(f"  {g.group}: not fitted: {g.error}")
            continue
        if g.fit.interval_note:
            params = ", ".join(f"{k}={v:.4g}" for k, v in g.fit.params.items()) + f" ({g.fit.interval_note})"
        else:
            params = ", ".join(f"{k}={v:.4g} {_interval(*g.fit.ci[k])}" for k, v in g.fit.params.items())
        console.print(f"  {g.group}: {params}")
        if g.fit.vertex is not None:
            console.print(f"    optimum at {spec.x}={g.fit.vertex:.4g} {_interval(*g.fit.vertex_ci)}")
        if g.turning_point is not None:
            tp = g.turning_point
            console.print(f"    turning point at {spec.x}={tp.x:.4g} {_interval(*tp.ci)}"
                          + ("" if tp.confident else " (not confident)"))
        if g.rollout is not None:
            console.print(f"    rollout (fit on the smaller {spec.x}, predict the next; "
                          f"{g.fit.level:.0%} prediction intervals with the trials' noise):")
            for h in g.rollout.steps:
                x = h.x if np.isscalar(h.x) else h.x[0] * h.x[1]
                console.print(f"      {spec.x}={x:.4g} from {h.n_fitted_x} smaller: predicted {h.predicted:.4g} "
                              f"{_interval(*h.prediction_interval)}, actual {h.actual:.4g}, "
                              f"error {h.error:+.3g} ({h.rel_error:+.1%}, "
                              f"{'inside' if h.inside else 'OUTSIDE'})")
        for warning in g.fit.diagnostics.warnings:
            console.print(f"    [yellow]warning[/yellow]: {warning}")
    if curve.isoflop is not None:
        _print_isoflop(curve.isoflop, spec, console)
