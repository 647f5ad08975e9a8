"""Scaling curves: fitting laws with bootstrap intervals, checks, and study-level outputs.

Notebook use:
    from orchestrator.curves import fit_curve
    fit = fit_curve(x, y, law="saturating_power", bootstrap=1000, seed=0)
    fit.params, fit.ci, fit.predict(x_new), fit.predict_interval(x_new)
"""
from .errors import CurveFitError
from .figures import plot_curve
from .fit import Diagnostics, FitResult, fit_curve
from .frontier import Frontier, FrontierPoint, compute_frontier
from .holdout import HoldoutCheck, holdout_check
from .laws import LAW_NAMES
from .mlflow_log import log_curves_to_mlflow
from .outputs import points_table, write_curve_outputs
from .points import x_is_searched
from .isoflop import IsoFlopSpec
from .study_curves import CurveSpec, GroupCurve, StudyCurve, fit_study_curves, spec_from_dict
from .turning import TurningPoint, find_turning_point

__all__ = [
    "CurveFitError", "CurveSpec", "Diagnostics", "FitResult", "Frontier", "FrontierPoint",
    "GroupCurve", "HoldoutCheck", "IsoFlopSpec", "LAW_NAMES", "StudyCurve", "TurningPoint", "compute_frontier",
    "find_turning_point", "fit_curve", "fit_study_curves", "holdout_check", "log_curves_to_mlflow",
    "plot_curve", "points_table", "write_curve_outputs", "x_is_searched", "spec_from_dict",
]
