"""The compute-optimal (isoFLOP) analysis on synthetic runs whose optimum is known."""
import numpy as np
import pandas as pd
import pytest

from orchestrator.curves import IsoFlopSpec, fit_study_curves

E, A, ALPHA, B, BETA = 0.3, 40.0, 0.34, 60.0, 0.28
SPEC = IsoFlopSpec(name="loss_vs_size_per_budget")


def _n_opt(c):
    """argmin over N of E + A N^-alpha + B D^-beta with D = C / (6 N)."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return g * (c / 6) ** (BETA / (ALPHA + BETA))


def _runs(budgets, sizes_for, noise=0.003, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for n in sizes_for(c):
            d = c / (6 * n)
            loss = (E + A * n ** -ALPHA + B * d ** -BETA) * np.exp(rng.normal(0, noise))
            rows.append(dict(trial_id=f"{c:g}-{n:.0f}", cell=f"{c:g}-{n:.0f}", status="finished", role="seed",
                             seed_of=None, flops_budget=c, flops=c * 1.01, encoder_params=n, images_seen=d,
                             eval_loss=loss))
    return pd.DataFrame(rows)


def _centred(c):
    return _n_opt(c) * np.geomspace(1 / 4, 4, 7)


def test_optimal_size_follows_compute_as_the_truth_does_and_the_largest_budget_is_predicted():
    budgets = [1e15, 1e16, 1e17, 1e18]
    curve = fit_study_curves(_runs(budgets, _centred), [SPEC], ("eval_loss", "min"), bootstrap=300)[SPEC.name]
    iso = curve.isoflop
    assert [b.budget for b in iso.budgets] == budgets and all(b.used and not b.flags for b in iso.budgets)
    for b in iso.budgets:  # a parabola in log N is close to, not exactly, the true curve (approach 2's bias)
        assert b.n_opt == pytest.approx(_n_opt(b.budget), rel=0.1) and b.n_opt_ci[0] < b.n_opt < b.n_opt_ci[1]
        assert b.d_opt == pytest.approx(b.budget / (6 * b.n_opt), rel=0.1)
    truth = BETA / (ALPHA + BETA)
    assert iso.n_opt.a_ci[0] <= truth <= iso.n_opt.a_ci[1] and abs(iso.n_opt.a - truth) < 0.05
    assert iso.d_opt.a == pytest.approx(1 - iso.n_opt.a, abs=0.05)  # N_opt * D_opt grows as C
    held = iso.held_out
    assert held.budget == 1e18 and held.n_inside and held.y_inside
    assert abs(held.predicted_n_opt / _n_opt(1e18) - 1) < 0.3
    two = iso.two_variable["params"]
    assert two["alpha"] == pytest.approx(ALPHA, abs=0.1) and two["beta"] == pytest.approx(BETA, abs=0.1)
    saved = curve.to_dict()["isoflop"]
    assert saved["n_opt_law"]["a"] == pytest.approx(iso.n_opt.a) and saved["held_out_budget"]["n_inside"]


def test_a_budget_without_an_interior_minimum_is_left_out_and_an_edge_optimum_is_flagged():
    def sizes(c):
        if c == 1e15:  # every size larger than the optimum: the loss only rises
            return _n_opt(c) * np.geomspace(2, 64, 6)
        if c == 1e16:  # the optimum near the smallest size
            return _n_opt(c) * np.geomspace(0.8, 40, 6)
        return _centred(c)

    iso = fit_study_curves(_runs([1e15, 1e16, 1e17, 1e18], sizes), [SPEC], ("eval_loss", "min"),
                           bootstrap=200)[SPEC.name].isoflop
    first, second = iso.budgets[:2]
    assert not first.used and "no interior minimum" in first.flags[0]
    assert second.used and "grid not centred" in second.flags[0] and "smaller" in second.flags[0]
    assert iso.n_opt is not None  # from the three usable budgets


def test_the_figure_shows_the_optimum_against_compute():
    from orchestrator.curves.figures import plot_curve

    curve = fit_study_curves(_runs([1e15, 1e16, 1e17], _centred), [SPEC], ("eval_loss", "min"),
                             bootstrap=100)[SPEC.name]
    fig = plot_curve(curve)
    assert len(fig.axes) == 2 and fig.axes[1].get_xscale() == "log"
    assert "N_opt" in " ".join(t.get_text() for t in fig.axes[1].get_legend().get_texts())
