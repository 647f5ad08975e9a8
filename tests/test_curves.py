"""Fitting library: recovery of known laws, interval coverage, speed, refusals, checks."""
import json
import time

import numpy as np
import pytest

from orchestrator.curves import (CurveFitError, compute_frontier, find_turning_point, fit_curve,
                                 holdout_check)

NOISE = 0.05  # multiplicative, as in the brief


def noisy(truth: np.ndarray, seed: int, sigma: float = NOISE) -> np.ndarray:
    return truth * np.exp(np.random.default_rng(seed).normal(0, sigma, truth.shape))


def test_power_recovers_parameters():
    x = np.logspace(0, 3, 30)
    fit = fit_curve(x, noisy(3 * x**-0.4, seed=0), "power", bootstrap=200)
    assert fit.param_names == ("A", "alpha")
    assert fit.params["alpha"] == pytest.approx(0.4, rel=0.05)
    assert fit.params["A"] == pytest.approx(3, rel=0.1)
    lo, hi = fit.ci["alpha"]
    assert lo < fit.params["alpha"] < hi  # whether it covers the truth is tested over replications


def test_saturating_power_recovers_parameters():
    # 5% recovery of the exponent needs a rich curve: at 30 points over 3 decades
    # the 95% interval alone is about +-15%.
    x = np.logspace(0, 4, 48)
    fit = fit_curve(x, noisy(0.2 + 3 * x**-0.4, seed=0), "saturating_power", bootstrap=200)
    assert fit.params["alpha"] == pytest.approx(0.4, rel=0.05)
    assert fit.params["E"] == pytest.approx(0.2, rel=0.15)
    for name, value in fit.params.items():
        assert fit.ci[name][0] <= value <= fit.ci[name][1], name


def test_chinchilla_recovers_exponents():
    n, d = np.meshgrid(np.logspace(4, 12, 10), np.logspace(6, 14, 10))
    x = np.column_stack([n.ravel(), d.ravel()])
    truth = 1.7 + 400 * x[:, 0] ** -0.34 + 410 * x[:, 1] ** -0.28
    fit = fit_curve(x, noisy(truth, seed=0), "chinchilla", bootstrap=100)
    assert fit.param_names == ("E", "A", "alpha", "B", "beta")
    assert fit.params["alpha"] == pytest.approx(0.34, rel=0.05)
    assert fit.params["beta"] == pytest.approx(0.28, rel=0.05)
    assert fit.predict(x[:3]).shape == (3,)


def test_quadratic_vertex_in_mask_ratio():
    m = np.repeat(np.linspace(0.1, 0.9, 9), 3)
    fit = fit_curve(m, noisy(1 + 2 * (m - 0.6) ** 2, seed=1), "quadratic", bootstrap=500)
    assert fit.vertex == pytest.approx(0.6, abs=0.03)
    assert fit.vertex_ci[0] < 0.6 < fit.vertex_ci[1]
    assert fit.vertex_is_optimum
    assert fit.diagnostics.space == "linear"


def test_quadratic_in_log_x_finds_isoflop_optimum():
    n_params = np.repeat(np.geomspace(1e7, 1e10, 12), 2)
    loss = 2 + 0.1 * (np.log(n_params) - np.log(3e8)) ** 2
    fit = fit_curve(n_params, noisy(loss, seed=1, sigma=0.02), "quadratic", log_x=True, bootstrap=500)
    assert fit.vertex == pytest.approx(3e8, rel=0.15)
    assert fit.vertex_ci[0] < 3e8 < fit.vertex_ci[1]


def test_higher_is_better_fits_the_error_and_predicts_accuracy():
    x = np.logspace(1, 3, 20)
    accuracy = 1 - noisy(0.2 + 2 * x**-0.5, seed=2)
    fit = fit_curve(x, accuracy, "saturating_power", bootstrap=200, higher_is_better=True)
    assert fit.params["E"] == pytest.approx(0.2, rel=0.2)  # parameters describe 1 - y
    pred = fit.predict([10.0, 1000.0])
    assert 1 - pred == pytest.approx(0.2 + 2 * np.array([10.0, 1000.0]) ** -0.5, rel=0.05)
    low, high = fit.predict_interval([10.0, 1000.0])
    assert np.all(low < pred) and np.all(pred < high)
    assert fit.to_dict()["fitted_quantity"] == "1 - y"


def test_interval_covers_true_exponent_in_at_least_90_of_100_replications():
    x = np.logspace(0, 3, 20)
    truth = 0.5 + 3 * x**-0.4
    covered = 0
    for rep in range(100):
        fit = fit_curve(x, noisy(truth, seed=1000 + rep), "saturating_power", bootstrap=200, seed=rep)
        lo, hi = fit.ci["alpha"]
        covered += lo <= 0.4 <= hi
    assert covered >= 90


def test_1000_bootstrap_resamples_of_30_points_are_fast():
    x = np.logspace(0, 3, 30)
    y = noisy(0.5 + 3 * x**-0.4, seed=3)
    start = time.perf_counter()
    fit = fit_curve(x, y, "saturating_power", bootstrap=1000, seed=0)
    elapsed = time.perf_counter() - start
    print(f"saturating_power, 30 points, 1000 resamples: {elapsed:.2f} s")
    assert fit.bootstrap_params.shape == (1000, 3)
    assert np.isfinite(fit.bootstrap_params).all()
    assert elapsed < 20


def test_bootstrap_is_reproducible_with_a_seed():
    x = np.logspace(0, 2, 12)
    y = noisy(1 + x**-0.5, seed=4)
    a = fit_curve(x, y, "saturating_power", bootstrap=100, seed=7)
    b = fit_curve(x, y, "saturating_power", bootstrap=100, seed=7)
    assert a.ci == b.ci


def test_diagnostics_and_serialisation():
    x = np.logspace(0, 3, 15)
    fit = fit_curve(x, noisy(0.5 + 3 * x**-0.4, seed=5), "saturating_power", bootstrap=100, level=0.9)
    diag = fit.diagnostics
    assert diag.space == "log" and len(diag.residuals) == 15
    assert diag.r2 > 0.9 and 0 < diag.rmse < 0.1
    assert diag.max_abs_residual == pytest.approx(np.abs(diag.residuals).max())
    out = json.loads(json.dumps(fit.to_dict(), allow_nan=False))
    assert out["law"] == "saturating_power" and out["level"] == 0.9
    assert out["param_names"] == ["E", "A", "alpha"]
    assert set(out["ci"]) == {"E", "A", "alpha"} and len(out["ci"]["alpha"]) == 2
    assert out["n_points"] == 15 and len(out["points"]["x"]) == 15
    assert "vertex" not in out and "holdout" not in out


@pytest.mark.parametrize("x, y, law, kwargs, reason", [
    ([1, 2, 3], [3, 2, 1], "saturating_power", {}, "too few points"),
    ([1, 1, 1, 2, 2], [3, 3, 2, 1, 1], "saturating_power", {}, "too few points"),
    (np.arange(1, 9), np.arange(1, 9) ** 0.3, "power", {}, "no decrease"),
    (np.arange(1, 9), np.ones(8), "saturating_power", {}, "no decrease"),
    (np.arange(1, 9), [3, 2, 1, 0, -1, -2, -3, -4], "power", {}, "> 0"),
    ([0, 1, 2, 3, 4], [5, 4, 3, 2, 1], "power", {}, "x > 0"),
    (np.arange(1, 9), 60 + np.arange(8), "power", {"higher_is_better": True}, "fraction below 1"),
    ([0.1, 0.2, 0.3], [1, 0.5, 1], "quadratic", {}, "too few points"),
])
def test_refusals_say_why_in_one_line(x, y, law, kwargs, reason):
    with pytest.raises(CurveFitError) as err:
        fit_curve(x, y, law, bootstrap=10, **kwargs)
    assert isinstance(err.value, ValueError)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_as_many_distinct_x_as_parameters_gives_no_interval():
    """A real run: two equal replicates at x=16, one trial at 64 and at 256. The
    law passes through the three means, and every bootstrap resample that can be
    fitted refits them: a zero-width interval would claim certainty."""
    x, y = [16, 16, 64, 256], [0.723, 0.723, 0.748, 0.762]
    fit = fit_curve(x, y, "saturating_power", bootstrap=200, higher_is_better=True, log_x=True)
    assert fit.n_bootstrap == 0 and "3 distinct x for 3 parameters" in fit.interval_note
    assert all(np.isnan(bounds).all() for bounds in fit.ci.values())
    assert fit.predict([64])[0] == pytest.approx(0.748, abs=1e-6)
    assert json.loads(json.dumps(fit.to_dict()))["interval_note"] == fit.interval_note
    # one more distinct x than parameters: intervals as usual
    fit2 = fit_curve(x, y, "power", bootstrap=200, higher_is_better=True)
    assert fit2.interval_note is None and fit2.n_bootstrap == 200


def test_holdout_check_predicts_the_largest_x():
    x = np.repeat(np.logspace(0, 3, 8), 2)
    y = noisy(0.5 + 3 * x**-0.4, seed=6)
    check = holdout_check(x, y, "saturating_power", bootstrap=300)
    assert check.x == pytest.approx(1000) and check.n_heldout == 2
    assert check.actual == pytest.approx(y[x == x.max()].mean())
    assert check.fit.n_points == 14
    assert check.interval[0] < check.predicted < check.interval[1]
    assert check.prediction_interval[0] <= check.interval[0] and check.interval[1] <= check.prediction_interval[1]
    assert abs(check.rel_error) < 0.1
    assert check.inside
    assert json.dumps(check.to_dict(), allow_nan=False)


def test_holdout_check_of_two_variable_law_holds_out_the_largest_compute():
    n, d = np.meshgrid(np.logspace(6, 9, 4), np.logspace(8, 11, 4))
    x = np.column_stack([n.ravel(), d.ravel()])
    y = noisy(1.7 + 400 * x[:, 0] ** -0.34 + 410 * x[:, 1] ** -0.28, seed=7)
    check = holdout_check(x, y, "chinchilla", bootstrap=50)
    assert check.x == (1e9, 1e11) and check.fit.n_points == 15


def test_turning_point_found_where_error_turns_up():
    seq = np.repeat([16, 32, 64, 128, 256, 512, 1024.0], 3)
    error = 0.3 + 0.0125 * (np.log(seq) - np.log(200)) ** 2
    tp = find_turning_point(seq, 1 - noisy(error, seed=8, sigma=0.02), higher_is_better=True, bootstrap=300)
    assert tp is not None and tp.confident
    assert tp.x == pytest.approx(200, rel=0.2)
    assert tp.ci[0] < tp.x < tp.ci[1] and tp.rise_slope > 0


def test_no_confident_turning_point_on_a_decreasing_curve():
    x = np.logspace(0, 3, 12)
    for error in (0.5 + 3 * x**-0.4, 3 * x**-0.4):
        # A quadratic in log x can put a minimum inside the range of any convex
        # decreasing curve; the rise test must not call it a turning point.
        tp = find_turning_point(x, noisy(error, seed=9), bootstrap=300)
        assert tp is None or not tp.confident


def test_frontier_on_a_hand_made_example():
    compute = [1, 2, 2, 3, 4, 5, 6]
    loss = [5.0, 4.0, 3.5, 3.6, 2.0, 2.5, 2.0]
    group = ["small", "small", "large", "small", "large", "small", "large"]
    frontier = compute_frontier(compute, loss, group)
    assert [(p.compute, p.objective, p.group) for p in frontier.points] == [
        (1, 5.0, "small"), (2, 3.5, "large"), (4, 2.0, "large")]
    assert frontier.groups == ["small", "large"]
    assert frontier.best_at(3.9).objective == 3.5 and frontier.best_at(100).group == "large"
    assert frontier.best_at(0.5) is None

    accuracy = compute_frontier([1, 2, 3], [0.5, 0.4, 0.7], ["a", "b", "c"], higher_is_better=True)
    assert [p.group for p in accuracy.points] == ["a", "c"]
