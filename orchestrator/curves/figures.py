"""Figures of study curves: points with their spread, fitted curves, bands, checks."""
from __future__ import annotations

import io
import textwrap

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
from matplotlib.lines import Line2D
from matplotlib.transforms import ScaledTranslation

from .fit import FitResult
from .laws import POWER_LAWS
from .study_curves import GroupCurve, StudyCurve

FORMULAS = {
    "power": "y = A·x^(-α)",
    "saturating_power": "y = E + A·x^(-α)",
    "chinchilla": "y = E + A/N^α + B/D^β",
    "quadratic": "y = a + b·s + c·s²",
}
SYMBOLS = {"alpha": "α", "beta": "β"}
Y_MARGIN = 0.75  # data spans of room beyond the observed y, above and below
X_MARGIN = 0.25  # data spans of room beyond the observed x, left and right
HELD_OUT_OFFSET_INCH = 0.1  # draw the prediction beside the actual held-out point, not on it


def _interval(value: float, ci: tuple[float, float]) -> str:
    if not np.isfinite(ci).all():
        return f"{value:.3g} (no interval)"
    return f"{value:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]"


def _fit_label(group: str, fit: FitResult) -> str:
    if fit.law == "quadratic":
        kind = "optimum" if fit.vertex_is_optimum else "worst"
        return f"{group}: {kind} at x = {_interval(fit.vertex, fit.vertex_ci)}"
    exponents = [n for n in fit.param_names if n in SYMBOLS]
    return f"{group}: " + ", ".join(f"{SYMBOLS[n]} = {_interval(fit.params[n], fit.ci[n])}" for n in exponents)


def _band_drawn(g: GroupCurve) -> bool:
    """With one degree of freedom left, Student's t makes a band wide enough to
    cover the plot and hide the other groups: its numbers stay in the legend."""
    return g.fit is not None and g.fit.diagnostics.dof >= 2


def _group_label(g: GroupCurve) -> str:
    if g.fit is not None:
        label = _fit_label(g.group, g.fit)
        if g.turning_point is not None:
            tp = g.turning_point
            label += f"\n    turning point at x = {_interval(tp.x, tp.ci)}" + ("" if tp.confident else " (not confident)")
        if not _band_drawn(g):
            label += f"\n    no band drawn: {g.fit.diagnostics.dof} degree of freedom"
        return label
    if g.error:
        return textwrap.fill(f"{g.group}: no fit ({g.error})", 48)
    return g.group


def _title(curve: StudyCurve) -> str:
    spec = curve.spec
    x = spec.x if isinstance(spec.x, str) else f"({spec.x[0]}, {spec.x[1]})"
    lines = [f"{spec.name}: {spec.y} vs {x}"]
    if spec.law:
        formula = FORMULAS[spec.law]
        if spec.law == "quadratic":
            formula += ", s = log x" if spec.log_x else ", s = x"
        lines.append(formula + ("  (fitted to the error 1 - y)" if spec.higher_is_better else ""))
    return "\n".join(lines)


def _plot_group(ax: Axes, g: GroupCurve, color: str) -> None:
    s = g.summary
    ax.errorbar(s["x"], s["mean"], yerr=[s["mean"] - s["min"], s["max"] - s["mean"]], fmt="o", ms=4,
                capsize=3, color=color, label=_group_label(g))
    if g.fit is None:
        return
    fitted = g.samples()
    ax.plot(fitted["x"], fitted["fit"], color=color, lw=1.5)
    if _band_drawn(g):
        ax.fill_between(fitted["x"], fitted["band_low"], fitted["band_high"], color=color, alpha=0.15, lw=0)
    if g.holdout is not None:
        h = g.holdout
        ax.plot(h.x, h.actual, marker="*", ms=13, color=color, mec="black", ls="none", zorder=4)
    beside = ax.transData + ScaledTranslation(HELD_OUT_OFFSET_INCH, 0, ax.figure.dpi_scale_trans)
    for step in g.rollout.steps if g.rollout is not None else []:  # each x predicted from the smaller ones
        lo, hi = step.prediction_interval
        ax.errorbar(step.x, step.predicted, yerr=[[step.predicted - lo], [hi - step.predicted]], fmt="D",
                    ms=5, mfc="white", color=color, capsize=4, zorder=4, transform=beside)
    marks = [(g.turning_point.x, g.turning_point.ci, ":")] if g.turning_point else []
    if g.fit.vertex is not None and np.isfinite(g.fit.vertex):
        marks.append((g.fit.vertex, g.fit.vertex_ci, "--"))
    for x, ci, style in marks:
        ax.axvline(x, color=color, ls=style, lw=1.2)
        if np.all(np.isfinite(ci)):
            ax.axvspan(*ci, color=color, alpha=0.07, lw=0)


def _plot_frontier(ax: Axes, curve: StudyCurve) -> None:
    pts = curve.frontier.points
    ax.step([p.compute for p in pts], [p.objective for p in pts], where="post", color="black",
            ls="--", lw=1, label="compute-efficient frontier (" + ", ".join(curve.frontier.groups) + ")")
    f = curve.frontier_fit
    if f is not None and f.fit is not None:
        fitted = f.samples()
        ax.plot(fitted["x"], fitted["fit"], color="black", lw=1.8, label=_fit_label("frontier fit", f.fit))
        ax.fill_between(fitted["x"], fitted["band_low"], fitted["band_high"], color="black", alpha=0.1, lw=0)


def _marker_legend(curve: StudyCurve, level: float) -> list[Line2D]:
    groups = list(curve.groups.values())
    handles = []
    if any(g.holdout for g in groups) and curve.spec.law == "chinchilla":
        handles.append(Line2D([], [], marker="*", ms=11, mec="black", color="grey", ls="none",
                              label=f"largest N·D, held out: actual vs predicted without it\n"
                                    f"(bars: {level:.0%} interval)"))
    elif any(g.holdout for g in groups):
        handles += [Line2D([], [], marker="*", ms=11, mec="black", color="grey", ls="none",
                           label="largest x, held out: actual mean"),
                    Line2D([], [], marker="D", ms=5, mfc="white", color="grey", ls="none",
                           label=f"rollout: each x predicted from the smaller x only,\n"
                                 f"{level:.0%} interval with the trials' noise")]
    if any(g.turning_point for g in groups):
        handles.append(Line2D([], [], color="grey", ls=":", label="turning point (shade: interval)"))
    if any(g.fit is not None and g.fit.vertex is not None for g in groups):
        handles.append(Line2D([], [], color="grey", ls="--", label="vertex (shade: interval)"))
    return handles


def _plain_log_ticks(axis, limits: tuple[float, float]) -> None:
    """Label a log axis 16, 64, 256 or 0.5, 0.6 rather than 10^k when the numbers are short."""
    lo, hi = limits
    if not (lo > 1e-3 and hi < 1e5):
        return
    decades = np.log10(hi / lo)
    subs = np.arange(1.0, 10.0) if decades < 1 else (1.0, 2.0, 5.0) if decades < 3 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _observed_range(curve: StudyCurve) -> tuple[float, float]:
    """Lowest and highest observed y: trials and held-out means."""
    ys = [v for g in curve.groups.values() for v in (*g.summary["min"], *g.summary["max"])]
    ys += [g.holdout.actual for g in curve.groups.values() if g.holdout is not None]
    return float(np.nanmin(ys)), float(np.nanmax(ys))


def _limit_axis(ax: Axes, which: str, lo: float, hi: float, log: bool, margin: float, note: str) -> None:
    """Keep the observed points readable: axis `which` ("x" or "y") reaches at most
    `margin` data spans beyond [lo, hi]; a wider band or interval runs off the plot
    (its numbers are in the legend), which `note` says."""
    if log:
        ratio = (hi / lo) if hi > lo else 2.0
        limits = lo / ratio ** margin, hi * ratio ** margin
    else:
        span = (hi - lo) or abs(hi) * 0.1 or 1.0
        limits = lo - span * margin, hi + span * margin
    get, set_ = (ax.get_xlim, ax.set_xlim) if which == "x" else (ax.get_ylim, ax.set_ylim)
    shown = get()
    if shown[0] < limits[0] or shown[1] > limits[1]:
        set_(max(shown[0], limits[0]), min(shown[1], limits[1]))
        ax.text(0.01, 0.05 if which == "x" else 0.01, note, transform=ax.transAxes, fontsize=7, color="grey",
                va="bottom")


def _limit_y_to_data(ax: Axes, curve: StudyCurve, log: bool) -> None:
    _limit_axis(ax, "y", *_observed_range(curve), log, Y_MARGIN,
                "y axis limited to the data; wider intervals run off it")


def _limit_x_to_data(ax: Axes, curve: StudyCurve, log: bool) -> None:
    """A vertex or turning-point interval far wider than the data would squeeze
    the points into a corner."""
    xs = np.concatenate([g.x.ravel() for g in curve.groups.values()])
    _limit_axis(ax, "x", float(xs.min()), float(xs.max()), log, X_MARGIN,
                "x axis limited to the data; wider intervals run off it (see the legend)")


def _plot_one_variable(ax: Axes, curve: StudyCurve) -> None:
    spec = curve.spec
    for i, g in enumerate(curve.groups.values()):
        _plot_group(ax, g, f"C{i % 10}")
    if curve.frontier is not None:
        _plot_frontier(ax, curve)
    if spec.log_x:
        ax.set_xscale("log")
    _limit_x_to_data(ax, curve, spec.log_x)
    if spec.log_x:
        _plain_log_ticks(ax.xaxis, ax.get_xlim())
    log_y = spec.law in POWER_LAWS and not spec.higher_is_better
    if log_y:
        ax.set_yscale("log")
    _limit_y_to_data(ax, curve, log_y)
    if log_y:
        _plain_log_ticks(ax.yaxis, ax.get_ylim())
    ax.set_xlabel(spec.x + (" (log scale)" if spec.log_x else ""))
    ax.set_ylabel(spec.y + (" (higher is better)" if spec.higher_is_better else ""))


def _plot_parity(ax: Axes, curve: StudyCurve) -> None:
    """Two-variable laws: observed against fitted, one marker per trial."""
    spec = curve.spec
    for i, g in enumerate(curve.groups.values()):
        color = f"C{i % 10}"
        fitted = g.fit.predict(g.x) if g.fit is not None else np.full(len(g.y), np.nan)
        ax.plot(fitted, g.y, "o", ms=4, color=color, label=_group_label(g))
        if g.holdout is not None:
            h = g.holdout
            lo, hi = h.prediction_interval
            ax.errorbar(h.predicted, h.actual, xerr=[[h.predicted - lo], [hi - h.predicted]], fmt="*", ms=13,
                        color=color, mec="black", capsize=4, zorder=4)
    lo, hi = np.nanmin([ax.get_xlim(), ax.get_ylim()]), np.nanmax([ax.get_xlim(), ax.get_ylim()])
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, label="observed = fitted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax.xaxis, (lo, hi))
    _plain_log_ticks(ax.yaxis, (lo, hi))
    ax.set_xlabel(f"fitted {spec.y} (log scale)")
    ax.set_ylabel(f"observed {spec.y} (log scale)")


def _plot_isoflop_optimum(ax: Axes, curve: StudyCurve) -> None:
    """N_opt against compute: each budget's vertex with its interval, the fitted
    power law with its band, and the held-out budget's prediction beside it."""
    iso = curve.isoflop
    for i, b in enumerate(iso.budgets):
        if not b.used:  # its vertex is an extrapolation, and its interval spans decades
            ax.plot(b.compute, b.n_opt, "x", ms=7, color=f"C{i % 10}",
                    label=f"budget {b.budget:g}: no interior minimum (vertex, left out)")
            continue
        lo, hi = b.n_opt_ci
        ax.errorbar(b.compute, b.n_opt, yerr=[[max(0.0, b.n_opt - lo)], [max(0.0, hi - b.n_opt)]], fmt="o",
                    ms=6, capsize=3, color=f"C{i % 10}", label=f"budget {b.budget:g}")
    if iso.n_opt is not None:
        c = np.geomspace(min(b.compute for b in iso.budgets) / 2, max(b.compute for b in iso.budgets) * 2, 50)
        lo, hi = iso.n_opt.predict_interval(c, iso.level)
        ax.plot(c, iso.n_opt.predict(c), color="black", lw=1.5,
                label=f"N_opt = k·C^a, a = {iso.n_opt.a:.3g} [{iso.n_opt.a_ci[0]:.3g}, {iso.n_opt.a_ci[1]:.3g}]")
        ax.fill_between(c, lo, hi, color="black", alpha=0.1, lw=0)
    if iso.held_out is not None:
        h = iso.held_out
        beside = ax.transData + ScaledTranslation(HELD_OUT_OFFSET_INCH, 0, ax.figure.dpi_scale_trans)
        budget = next(b for b in iso.budgets if b.budget == h.budget)
        lo, hi = h.n_opt_interval
        ax.errorbar(budget.compute, h.predicted_n_opt, yerr=[[h.predicted_n_opt - lo], [hi - h.predicted_n_opt]],
                    fmt="D", ms=5, mfc="white", color="black", capsize=4, transform=beside,
                    label="largest budget predicted from the smaller ones")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # minor labels overlapped within a decade
    ax.set_xlabel("compute (training FLOPs, counted from the model)")
    ax.set_ylabel(f"optimal {curve.spec.x}")
    ax.set_title("compute-optimal model size", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def plot_curve(curve: StudyCurve) -> Figure:
    """One figure per curve: every group in its own colour, with a legend; a
    compute-optimal curve also shows its optimum against compute."""
    fig = Figure(figsize=(16 if curve.isoflop else 10, 5.5), layout="constrained")
    ax = fig.add_subplot(1, 2, 1) if curve.isoflop else fig.add_subplot()
    if curve.isoflop:
        _plot_isoflop_optimum(fig.add_subplot(1, 2, 2), curve)
    fits = [g.fit for g in curve.groups.values() if g.fit is not None]
    level = fits[0].level if fits else 0.95
    if curve.spec.law == "chinchilla":
        _plot_parity(ax, curve)
    else:
        _plot_one_variable(ax, curve)
    ax.set_title(_title(curve), fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    points = ("one point per trial\n" if curve.spec.law == "chinchilla"
              else "points: mean over trials, bars: min-max\nbands and ")
    ax.legend(handles=handles + _marker_legend(curve, level), loc="upper left", bbox_to_anchor=(1.01, 1),
              fontsize=8, title_fontsize=8, title=f"{points}[ ]: {level:.0%} bootstrap intervals")
    if curve.error:
        ax.text(0.5, 0.5, curve.error, transform=ax.transAxes, ha="center", va="center")
    return fig


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()
