"""How often a fit's intervals hold the truth, on synthetic studies whose truth is
known: the check that the intervals mean what they claim at the sizes studies
have (bench/interval_coverage.py prints it; tests/test_curve_checks.py holds it
between bounds)."""
from __future__ import annotations

import numpy as np

from .errors import CurveFitError
from .fit import fit_curve

# truth: y = A x^-alpha with multiplicative noise (power) and y = a + c (x - x0)^2 with
# additive noise (quadratic, vertex x0); noise is a share of y
POWER = {"A": 3.0, "alpha": 0.35}
QUAD = {"a": 0.3, "c": 2.0, "x0": 0.72}


def power_data(rng, n_x, reps, noise):
    x = np.repeat(16 * 2.0 ** np.arange(n_x), reps)  # a ladder doubling x
    y = POWER["A"] * x ** -POWER["alpha"] * np.exp(rng.normal(0, noise, len(x)))
    return x, y, x.max() * 2


def quad_data(rng, n_x, reps, noise):
    x = np.repeat(np.linspace(0.45, 0.95, n_x), reps)
    truth = QUAD["a"] + QUAD["c"] * (x - QUAD["x0"]) ** 2
    # an accuracy's scatter does not scale with its value: noise is a share of the mean
    return x, truth + rng.normal(0, noise * truth.mean(), len(x)), None


def coverage(law: str, n_x: int, reps: int, noise: float, datasets: int = 100,
             bootstrap: int = 300) -> tuple[dict[str, tuple[float, float]], int]:
    """{interval: (% of datasets whose interval holds the truth, mean width)} and the
    number of datasets whose fit had no interval. Power: the parameters, the band
    at twice the largest x and the interval for a new trial there; quadratic: the
    vertex and the band at the largest x."""
    hits, widths = {}, {}

    def record(name, lo, hi, truth):
        hits.setdefault(name, []).append(lo <= truth <= hi)
        widths.setdefault(name, []).append(hi - lo)

    rng = np.random.default_rng(1000 * n_x + 10 * reps + int(100 * noise))
    refused = 0
    for _ in range(datasets):
        if law == "power":
            x, y, x_next = power_data(rng, n_x, reps, noise)
        else:
            x, y, x_next = quad_data(rng, n_x, reps, noise)
        try:
            fit = fit_curve(x, y, law, bootstrap=bootstrap, seed=int(rng.integers(1 << 30)))
        except CurveFitError:
            refused += 1
            continue
        if fit.n_bootstrap == 0:
            refused += 1
            continue
        if law == "power":
            record("A", *fit.ci["A"], POWER["A"])
            record("alpha", *fit.ci["alpha"], POWER["alpha"])
            true_next = POWER["A"] * x_next ** -POWER["alpha"]
            lo, hi = fit.predict_interval([x_next])
            record("band@next", lo[0], hi[0], true_next)
            lo, hi = fit.predict_interval([x_next], n_trials=1)
            record("new trial@next", lo[0], hi[0], true_next * np.exp(rng.normal(0, noise)))
        else:
            record("vertex", *fit.vertex_ci, QUAD["x0"])
            xm = x.max()
            lo, hi = fit.predict_interval([xm])
            record("band@max", lo[0], hi[0], QUAD["a"] + QUAD["c"] * (xm - QUAD["x0"]) ** 2)
    return {k: (100 * np.mean(v), np.mean(widths[k])) for k, v in hits.items()}, refused
