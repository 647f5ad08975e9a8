"""fit_curve: one law fitted to one curve, with bootstrap intervals and diagnostics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import f as f_dist
from scipy.stats import norm, spearmanr
from scipy.stats import t as t_dist

from .errors import CurveFitError
from .laws import PowerSumLaw, QuadraticLaw, get_law

if TYPE_CHECKING:
    from .holdout import HoldoutCheck


def json_number(v: float) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    v = float(v)
    return v if np.isfinite(v) else None


def quantile_bounds(level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return (1 - level) / 2, (1 + level) / 2


def small_sample_factor(n: int, n_params: int, level: float) -> float:
    """How much wider a bootstrap interval must be, at n points and p parameters,
    to hold the truth as often as it claims: with few degrees of freedom the
    tails are Student's t, not normal. 1 for large n; checked by
    orchestrator/curves/calibration.py."""
    dof = n - n_params
    if dof < 1:
        return float("nan")
    hi_q = quantile_bounds(level)[1]
    return float(t_dist.ppf(hi_q, dof) / norm.ppf(hi_q))


@dataclass
class Diagnostics:
    """Goodness of fit, measured where the fit was made (`space`: log y or y).

    trend_p: Spearman test of the residuals against x (a trend the law left
    unexplained); spread_p: of |residual| against x (noise that grows with x).
    `warnings` says in words what a reader should distrust.
    """
    space: str
    rmse: float
    r2: float
    max_abs_residual: float
    residuals: np.ndarray  # observed - fitted, one per point, in `space`
    dof: int  # points minus parameters
    trend_p: float = float("nan")
    spread_p: float = float("nan")
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space, "rmse": json_number(self.rmse), "r2": json_number(self.r2),
                "max_abs_residual": json_number(self.max_abs_residual), "dof": self.dof,
                "trend_p": json_number(self.trend_p), "spread_p": json_number(self.spread_p),
                "warnings": self.warnings, "residuals": [json_number(r) for r in self.residuals]}


@dataclass
class FitResult:
    """A fitted law.

    With higher_is_better=True the law describes the error 1 - y: `params`,
    `ci`, `diagnostics` and the vertex curvature refer to that error, while
    `x`, `y`, `predict` and `predict_interval` are on the original y scale
    (they return 1 - fitted error, e.g. an accuracy).
    """
    law: str
    param_names: tuple[str, ...]
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    level: float
    x: np.ndarray  # (n,) or (n, 2) for two-variable laws
    y: np.ndarray
    higher_is_better: bool
    log_x: bool
    diagnostics: Diagnostics
    bootstrap_params: np.ndarray  # (n_bootstrap, p) natural parameters of each resample
    vertex: float | None = None  # quadratic: x at the stationary point
    vertex_ci: tuple[float, float] | None = None
    vertex_is_optimum: bool | None = None  # the vertex is the best y (not the worst)
    holdout: HoldoutCheck | None = None  # attached by the study code when checked
    interval_note: str | None = None  # why there are no intervals, when there are none
    _law: PowerSumLaw | QuadraticLaw = field(default=None, repr=False)
    _center: np.ndarray = field(default=None, repr=False)
    _theta: np.ndarray = field(default=None, repr=False)
    _theta_boot: np.ndarray = field(default=None, repr=False)
    _seed: int = field(default=0, repr=False)

    @property
    def n_points(self) -> int:
        return len(self.y)

    @property
    def n_bootstrap(self) -> int:
        return len(self.bootstrap_params)

    def _to_y(self, t: np.ndarray) -> np.ndarray:
        z = self._law.from_fit_space(t)
        return 1 - z if self.higher_is_better else z

    def _fit_space(self, x_new) -> np.ndarray:
        return self._law.features(as_inputs(x_new, self._law.n_inputs), self._center)

    def predict(self, x_new) -> np.ndarray:
        """Fitted y at x_new (original scale, see the class docstring)."""
        return self._to_y(self._law.predict(self._theta[None], self._fit_space(x_new))[0])

    def predict_interval(self, x_new, level: float | None = None,
                         n_trials: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Bootstrap interval (low, high) at x_new on the original y scale.

        n_trials=None: confidence band of the fitted curve. n_trials=k: interval
        for the mean of k new trials (what an observed point should fall inside):
        each side of the band widened by the trials' own noise, z · s / sqrt(k),
        s the residual scale corrected for the parameters fitted.
        """
        if self.n_bootstrap == 0:
            raise ValueError("this fit was made with bootstrap=0: no intervals")
        lo_q, hi_q = quantile_bounds(self.level if level is None else level)
        u = self._fit_space(x_new)
        lo, hi = np.nanquantile(self._law.predict(self._theta_boot, u), [lo_q, hi_q], axis=0)
        if n_trials:
            center = self._law.predict(self._theta[None], u)[0]
            noise = norm.ppf(hi_q) * self.noise_scale / np.sqrt(n_trials)
            lo, hi = center - np.hypot(center - lo, noise), center + np.hypot(hi - center, noise)
        a, b = self._to_y(lo), self._to_y(hi)
        return np.minimum(a, b), np.maximum(a, b)

    @property
    def noise_scale(self) -> float:
        """Trial-to-trial scatter in the fit space: the residuals' RMS, which a fit
        of p parameters to n points shrinks by sqrt((n - p) / n)."""
        d = self.diagnostics
        return d.rmse * np.sqrt(self.n_points / d.dof) if d.dof > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no arrays, NaN as null)."""
        out: dict[str, Any] = {
            "law": self.law,
            "param_names": list(self.param_names),
            "params": {k: json_number(v) for k, v in self.params.items()},
            "ci": {k: [json_number(lo), json_number(hi)] for k, (lo, hi) in self.ci.items()},
            "level": self.level,
            "n_points": self.n_points,
            "n_bootstrap": self.n_bootstrap,
            "interval_note": self.interval_note,
            "higher_is_better": self.higher_is_better,
            "fitted_quantity": "1 - y" if self.higher_is_better else "y",
            "log_x": self.log_x,
            "points": {"x": np.asarray(self.x, float).tolist(), "y": np.asarray(self.y, float).tolist()},
            "diagnostics": self.diagnostics.to_dict(),
        }
        if self.vertex is not None:
            out["vertex"] = {"x": json_number(self.vertex),
                             "ci": [json_number(v) for v in self.vertex_ci],
                             "is_optimum": self.vertex_is_optimum,
                             "y": json_number(self.predict([self.vertex])[0])
                             if np.isfinite(self.vertex) else None}
        if self.holdout is not None:
            out["holdout"] = self.holdout.to_dict()
        return out


def as_inputs(x, n_inputs: int) -> np.ndarray:
    """x as an (n, n_inputs) float array."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1 and n_inputs == 1:
        return arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != n_inputs:
        shape = "(n,)" if n_inputs == 1 else f"(n, {n_inputs})"
        raise CurveFitError(f"x must have shape {shape}, got {arr.shape}")
    return arr


def _refuse_unfittable(law, inputs: np.ndarray, z: np.ndarray, higher_is_better: bool) -> None:
    what = "error 1 - y" if higher_is_better else "y"
    if len(z) != len(inputs):
        raise CurveFitError(f"x has {len(inputs)} points but y has {len(z)}")
    if not (np.isfinite(inputs).all() and np.isfinite(z).all()):
        raise CurveFitError("x and y must be finite (no NaN or infinity)")
    p = len(law.param_names)
    distinct = len(np.unique(inputs, axis=0))
    if len(z) < p + 1 or distinct < p:
        raise CurveFitError(f"too few points for {law.name}: {len(z)} points at {distinct} distinct x, "
                            f"need at least {p + 1} points at {p} distinct x")
    if law.uses_log_x and (inputs <= 0).any():
        raise CurveFitError(f"{law.name} needs x > 0 (it uses log x)")
    if law.fit_space == "log" and (z <= 0).any():
        hint = " (higher_is_better expects y as a fraction below 1)" if higher_is_better else ""
        raise CurveFitError(f"{law.name} needs {what} > 0 (it fits log {what}){hint}")
    if law.decreasing:
        slopes = law.slopes(law.features(inputs, law.center(inputs)), law.to_fit_space(z))
        if (slopes >= 0).all():
            raise CurveFitError(f"no decrease to fit: {what} does not decrease with x "
                                f"(log-log slope {', '.join(f'{s:+.3g}' for s in slopes)})")


TREND_P = 0.05  # residual tests below this are reported as warnings


def _diagnostics(space: str, size: np.ndarray, t: np.ndarray, fitted: np.ndarray, n_params: int) -> Diagnostics:
    resid = t - fitted
    total = ((t - t.mean()) ** 2).sum()
    diag = Diagnostics(space=space, rmse=float(np.sqrt((resid**2).mean())),
                       r2=float(1 - (resid**2).sum() / total) if total > 0 else float("nan"),
                       max_abs_residual=float(np.abs(resid).max()), residuals=resid, dof=len(t) - n_params)
    if len(np.unique(size)) >= 4 and np.ptp(resid) > 0:  # fewer x cannot show a trend
        diag.trend_p = _trend_p(np.log(size) if (size > 0).all() else size, resid)
        diag.spread_p = float(spearmanr(size, np.abs(resid)).pvalue)
        if diag.trend_p < TREND_P:
            diag.warnings.append(f"the residuals trend with x (p = {diag.trend_p:.2g}): "
                                 f"the law misses a slope or bend the data have")
        if diag.spread_p < TREND_P:
            diag.warnings.append(f"the scatter grows with x (Spearman p = {diag.spread_p:.2g}): "
                                 f"intervals far from the data's middle are too narrow")
    if diag.dof < 2:
        diag.warnings.append(f"{diag.dof} degree(s) of freedom: the intervals rest on almost nothing")
    return diag


def _trend_p(s: np.ndarray, resid: np.ndarray) -> float:
    """F test of a line and a bend in the residuals against (log) x, against none:
    a law that fits leaves residuals with neither."""
    s = (s - s.mean()) / (s.std() or 1)
    design = np.column_stack([np.ones_like(s), s, s ** 2])
    coef, *_ = np.linalg.lstsq(design, resid, rcond=None)
    rss1 = ((resid - design @ coef) ** 2).sum()
    rss0 = ((resid - resid.mean()) ** 2).sum()
    dof = len(resid) - 3
    if dof < 1 or rss1 <= 0:
        return float("nan")
    return float(f_dist.sf((rss0 - rss1) / 2 / (rss1 / dof), 2, dof))


def _narrow_interval_warning(fit: "FitResult") -> str | None:
    """A confidence band narrower than the scatter of the points allows: at the
    data's middle the band's half-width cannot honestly be below about
    z · s / sqrt(n), s the residual scale corrected for the parameters fitted."""
    if fit.n_bootstrap == 0 or fit.diagnostics.dof < 1:
        return None
    s = fit.noise_scale
    middle = np.median(fit.x, axis=0, keepdims=fit.x.ndim == 2)
    middle = middle if fit.x.ndim == 2 else np.array([middle])
    t = fit._law.predict(fit._theta_boot, fit._fit_space(middle))[:, 0]
    lo_q, hi_q = quantile_bounds(fit.level)
    half = (np.nanquantile(t, hi_q) - np.nanquantile(t, lo_q)) / 2
    floor = norm.ppf(hi_q) * s / np.sqrt(fit.n_points)
    if half < 0.5 * floor:
        return (f"the {fit.level:.0%} band is implausibly narrow: half-width {half:.2g} at the middle x, "
                f"where {fit.n_points} points with scatter {s:.2g} ({fit.diagnostics.space}) allow about {floor:.2g}")
    return None


def fit_curve(x, y, law: str = "saturating_power", *, bootstrap: int = 1000, seed: int = 0,
              level: float = 0.95, higher_is_better: bool = False, log_x: bool = False) -> FitResult:
    """Fit `law` to points (x, y) and bootstrap percentile intervals.

    Laws: power (y = A·x^-alpha), saturating_power (y = E + A·x^-alpha),
    chinchilla (y = E + A/N^alpha + B/D^beta, x of shape (n, 2) = (N, D)) and
    quadratic (y = a + b·s + c·s², s = log x if log_x else x). Power laws are
    fitted in log space with a Huber loss (delta 1e-3) from a grid of starts;
    the quadratic by least squares. Bootstrap resamples the points with
    replacement; all resamples are fitted at once. With higher_is_better the
    law is fitted to 1 - y (see FitResult). Raises CurveFitError when the
    data cannot support the law.
    """
    spec = get_law(law, log_x)
    lo_q, hi_q = quantile_bounds(level)
    inputs = as_inputs(x, spec.n_inputs)
    y = np.asarray(y, dtype=float)
    z = 1 - y if higher_is_better else y
    _refuse_unfittable(spec, inputs, z, higher_is_better)
    interval_note = None
    n_params, distinct = len(spec.param_names), len(np.unique(inputs, axis=0))
    if bootstrap and distinct == n_params:
        # No degree of freedom is left: an unconstrained law passes through the mean
        # at each x, a resample either refits those means or misses an x and cannot
        # be fitted, and the spread would say nothing about how well the law fits.
        bootstrap = 0
        interval_note = (f"no interval: {distinct} distinct x for {n_params} parameters "
                         f"leave no degree of freedom")

    center = spec.center(inputs)
    u = spec.features(inputs, center)
    t = spec.to_fit_space(z)
    theta = spec.fit(u, t)
    # Smoothed residual bootstrap: a study's x are designed, not drawn, so every
    # resample keeps them and draws new noise from the residuals (scaled up for the
    # parameters fitted), half of its variance from a normal of the same scale: the
    # almost-L1 fit leaves p residuals at zero, which alone would draw too little noise.
    fitted = spec.predict(theta[None], u)[0]
    dof = len(t) - n_params
    resid = (t - fitted) * np.sqrt(len(t) / dof) if dof > 0 else np.zeros_like(t)
    rng = np.random.default_rng(seed)
    noise = (rng.choice(resid, size=(bootstrap, len(t)))
             + rng.normal(0, np.sqrt((resid ** 2).mean()), size=(bootstrap, len(t)))) / np.sqrt(2)
    t_star = fitted + noise
    theta_boot = spec.fit_resamples(u, t_star, theta) if bootstrap else np.empty((0, len(theta)))
    # Few degrees of freedom: Student's tails, not normal ones. The resampled
    # parameters spread out around the fit by that factor, so that everything
    # derived from them (parameters, vertex, band) widens alike.
    theta_boot = theta + small_sample_factor(len(t), n_params, level) * (theta_boot - theta)

    params = spec.natural(theta[None], center)[0]
    boot = spec.natural(theta_boot, center)
    bounds = (np.nanquantile(boot, [lo_q, hi_q], axis=0) if bootstrap
              else np.full((2, len(params)), np.nan))
    result = FitResult(
        law=law, param_names=spec.param_names,
        params=dict(zip(spec.param_names, map(float, params))),
        ci={name: (float(bounds[0, i]), float(bounds[1, i])) for i, name in enumerate(spec.param_names)},
        level=level, x=inputs[:, 0] if spec.n_inputs == 1 else inputs, y=y,
        higher_is_better=higher_is_better, log_x=spec.uses_log_x,
        diagnostics=_diagnostics(spec.fit_space, inputs.prod(1), t, spec.predict(theta[None], u)[0],
                                 len(spec.param_names)),
        bootstrap_params=boot, interval_note=interval_note, _law=spec, _center=center, _theta=theta,
        _theta_boot=theta_boot, _seed=seed)
    if isinstance(spec, QuadraticLaw):
        result.vertex = float(spec.vertex(theta[None], center)[0])
        vertices = spec.vertex(theta_boot, center)
        result.vertex_ci = (tuple(map(float, np.nanquantile(vertices, [lo_q, hi_q])))
                            if bootstrap else (float("nan"), float("nan")))
        result.vertex_is_optimum = bool(theta[2] > 0)  # a minimum of the fitted (lower-is-better) quantity
    if warning := _narrow_interval_warning(result):
        result.diagnostics.warnings.append(warning)
    return result
