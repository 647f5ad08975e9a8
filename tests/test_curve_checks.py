"""Curves that predict: the rollout check, noise-inclusive prediction intervals,
and the residual diagnostics, on synthetic data whose truth is known."""
import numpy as np
import pytest

from orchestrator.curves import CurveSpec, fit_curve, fit_study_curves
from orchestrator.curves.holdout import rollout_check

X = np.geomspace(16, 4096, 6)


def _power(rng, reps=2, noise=0.03, bend=0.0):
    x = np.repeat(X, reps)
    y = 3.0 * x ** -0.35 * np.exp(bend * np.log(x / 256) ** 2) * np.exp(rng.normal(0, noise, len(x)))
    return x, y


def test_rollout_predicts_each_larger_x_from_the_smaller_ones_inside_its_intervals():
    x, y = _power(np.random.default_rng(0))
    rollout = rollout_check(x, y, "power", bootstrap=300, seed=0)
    # a power law (2 parameters) needs 3 distinct x for an interval: it predicts x 4, 5 and 6
    assert [s.n_fitted_x for s in rollout.steps] == [3, 4, 5]
    assert [s.x for s in rollout.steps] == pytest.approx(X[3:])
    assert len(rollout.skipped) == 2
    for step in rollout.steps:
        assert step.error == pytest.approx(step.predicted - step.actual)
        lo, hi = step.prediction_interval
        assert lo < step.interval[0] and step.interval[1] < hi  # the trials' noise widens it
    # over many studies with this truth, the 95% intervals hold the runs they predict
    inside, errors = [], []
    for seed in range(30):
        for step in rollout_check(*_power(np.random.default_rng(seed)), "power", bootstrap=200, seed=seed).steps:
            inside.append(step.inside)
            errors.append(step.rel_error)
    assert 0.88 <= np.mean(inside) <= 1.0 and abs(np.mean(errors)) < 0.01


def test_rollout_exposes_a_law_that_bends_away_and_the_residuals_say_so():
    x, y = _power(np.random.default_rng(1), noise=0.01, bend=0.08)  # turns up at large x
    rollout = rollout_check(x, y, "power", bootstrap=300, seed=0)
    assert not rollout.steps[-1].inside and rollout.steps[-1].error < 0  # predicted too low
    fit = fit_curve(x, y, "power", bootstrap=300)
    assert any("trend with x" in w for w in fit.diagnostics.warnings)
    assert fit.diagnostics.trend_p < 0.05


def test_spread_growing_with_x_is_flagged():
    rng = np.random.default_rng(2)
    x = np.repeat(X, 3)
    noise = np.interp(np.log(x), np.log(X[[0, -1]]), [0.002, 0.15])
    y = 3.0 * x ** -0.35 * np.exp(rng.normal(0, 1, len(x)) * noise)
    fit = fit_curve(x, y, "power", bootstrap=200)
    assert any("scatter grows with x" in w for w in fit.diagnostics.warnings)
    clean = fit_curve(*_power(np.random.default_rng(3)), "power", bootstrap=200)
    assert clean.diagnostics.warnings == []


def test_few_degrees_of_freedom_are_flagged():
    x = np.array([16, 64, 256, 1024.0])
    fit = fit_curve(x, 3 * x ** -0.35 * np.array([1.01, 0.99, 1.0, 1.02]), "saturating_power", bootstrap=50)
    assert any("degree(s) of freedom" in w for w in fit.diagnostics.warnings)


def test_every_study_curve_carries_its_rollout_and_the_holdout_is_its_last_step():
    rng = np.random.default_rng(4)
    import pandas as pd

    x, y = _power(rng)
    table = pd.DataFrame({"trial_id": [f"t{i}" for i in range(len(x))], "seq_len": x, "eval_loss": y,
                          "status": "finished"})
    spec = CurveSpec(name="c", x="seq_len", y="eval_loss", law="power")
    group = fit_study_curves(table, [spec], ("eval_loss", "min"), bootstrap=100)["c"].groups["all"]
    assert group.rollout is not None and group.holdout is group.rollout.steps[-1]
    saved = group.to_dict()["rollout"]
    assert [s["n_fitted_x"] for s in saved["steps"]] == [3, 4, 5] and saved["inside_fraction"] == 1.0


@pytest.mark.parametrize("law", ["power", "quadratic"])
def test_95_percent_intervals_hold_the_truth_90_to_99_percent_of_the_time_at_study_sizes(law):
    """Parameters, vertex, curve band and the interval for a new trial, at 4 and 8
    distinct x, 1 and 3 replicates, 2% and 10% noise (bench/interval_coverage.py
    prints the same with the widths)."""
    from orchestrator.curves.calibration import coverage

    for n_x, reps, noise in [(n, r, s) for n in (4, 8) for r in (1, 3) for s in (0.02, 0.10)]:
        result, refused = coverage(law, n_x, reps, noise, datasets=300, bootstrap=200)
        assert refused == 0
        for interval, (held, width) in result.items():
            assert 90 <= held <= 99, f"{law} x={n_x} reps={reps} noise={noise}: {interval} held {held}%"
