"""Scaling laws: their parameters, how they predict, and how one is fitted.

Each law works on raw parameters in a well-conditioned internal space and
converts them to the reported (natural) parameters. Fitting happens in a
"fit space": log y for the power laws, y itself for the quadratic.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from .optimise import huber_lbfgs, huber_lm, weighted_lstsq

EXPONENT_MAX = 10.0  # far beyond any physical scaling exponent; keeps bad resamples finite
COEF_START_OFFSETS = (-4.0, -1.5, 0.0)  # term size at the centre, relative to median y (log)
EXPONENT_STARTS = (0.1, 0.3, 0.7, 1.5)
CONSTANT_START_FRACTIONS = (0.1, 0.5, 0.9)  # irreducible term E as a fraction of min y
GRID_SCOUT_STEPS, GRID_FINALISTS = 25, 8  # same optimum as running every start out, 5-10x faster


@dataclass(frozen=True)
class Term:
    """One positive term C·x_j^(-gamma) of a power-sum law (a constant if no exponent)."""
    coef: str
    exponent: str | None = None
    feature: int | None = None


class PowerSumLaw:
    """y = sum_k C_k · x_{j_k}^(-gamma_k), fitted as log y = logsumexp_k(c_k - gamma_k·u_j).

    c_k = log C_k keeps every term positive, and u = log x - mean(log x)
    centres the inputs, which decorrelates c_k from gamma_k and conditions the
    fit. Raw parameters are (c_k, gamma_k) in centred units.
    """

    fit_space = "log"
    decreasing = True
    uses_log_x = True

    def __init__(self, name: str, terms: tuple[Term, ...], n_inputs: int):
        self.name, self.terms, self.n_inputs = name, terms, n_inputs
        names, layout = [], []
        for term in terms:
            names.append(term.coef)
            if term.exponent is None:
                layout.append((len(names) - 1, None, None))
            else:
                names.append(term.exponent)
                layout.append((len(names) - 2, len(names) - 1, term.feature))
        self.param_names = tuple(names)
        self._layout = layout

    def center(self, x: np.ndarray) -> np.ndarray:
        return np.log(x).mean(0)

    def features(self, x: np.ndarray, center: np.ndarray) -> np.ndarray:
        return np.log(x) - center

    @staticmethod
    def to_fit_space(z: np.ndarray) -> np.ndarray:
        return np.log(z)

    @staticmethod
    def from_fit_space(t: np.ndarray) -> np.ndarray:
        return np.exp(t)

    def model(self, theta: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log-predictions (B, n) and their Jacobian (B, n, p) for raw theta (B, p)."""
        batch, n = theta.shape[0], u.shape[0]
        terms = np.empty((batch, n, len(self._layout)))
        for k, (ci, ei, j) in enumerate(self._layout):
            terms[..., k] = theta[:, ci, None] if ei is None else theta[:, ci, None] - theta[:, ei, None] * u[:, j]
        top = terms.max(-1, keepdims=True)
        expd = np.exp(terms - top)
        total = expd.sum(-1, keepdims=True)
        share = expd / total  # d logsumexp / d term
        jac = np.empty((batch, n, len(self.param_names)))
        for k, (ci, ei, j) in enumerate(self._layout):
            jac[..., ci] = share[..., k]
            if ei is not None:
                jac[..., ei] = -share[..., k] * u[:, j]
        return (top + np.log(total))[..., 0], jac

    def predict(self, theta: np.ndarray, u: np.ndarray) -> np.ndarray:
        return self.model(theta, u)[0]

    def natural(self, theta: np.ndarray, center: np.ndarray) -> np.ndarray:
        """C_k = exp(c_k + gamma_k·mean log x_j) undoes the centring; exponents are unchanged."""
        out = np.array(theta, dtype=float)
        for ci, ei, j in self._layout:
            shift = 0.0 if ei is None else theta[:, ei] * center[j]
            out[:, ci] = np.exp(theta[:, ci] + shift)
        return out

    def slopes(self, u: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Least-squares slopes of log y on each log x: the crude trend used to refuse flat data."""
        design = np.column_stack([np.ones(len(t)), u])
        return np.linalg.lstsq(design, t, rcond=None)[0][1:]

    def _bounds(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exponents in [0, EXPONENT_MAX] (the law decreases); a term may vanish but not dwarf the data."""
        lower = np.zeros(len(self.param_names))
        upper = np.full(len(self.param_names), EXPONENT_MAX)
        for ci, _, _ in self._layout:
            lower[ci], upper[ci] = t.min() - 25.0, t.max() + 5.0
        return lower, upper

    def _start_grid(self, t: np.ndarray) -> np.ndarray:
        axes = []
        for term in self.terms:  # same order as param_names: coefficient, then its exponent
            if term.exponent is None:
                axes.append(t.min() + np.log(CONSTANT_START_FRACTIONS))
            else:
                axes += [np.median(t) + np.array(COEF_START_OFFSETS), np.array(EXPONENT_STARTS)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))

    def fit(self, u: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Best raw parameters over a grid of starts, the best polished by L-BFGS-B.

        All starts descend together for a few steps; only the most promising
        few are run to convergence (the chinchilla grid has 432 starts).
        """
        lower, upper = self._bounds(t)
        model = partial(self.model, u=u)
        ones = np.ones((1, len(t)))
        theta, loss = huber_lm(model, t, ones, self._start_grid(t), lower, upper, max_iter=GRID_SCOUT_STEPS)
        keep = np.argsort(loss)[:GRID_FINALISTS]
        theta, loss = huber_lm(model, t, ones, theta[keep], lower, upper)
        best = theta[np.argmin(loss)]
        polished, polished_loss = huber_lbfgs(model, t, best, lower, upper)
        return polished if polished_loss <= loss.min() else best

    def fit_resamples(self, u: np.ndarray, t_star: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Raw parameters (B, p) for each row of targets (B, n), all starting from the
        full-data optimum."""
        lower, upper = self._bounds(t_star)
        starts = np.repeat(start[None], t_star.shape[0], 0)
        return huber_lm(partial(self.model, u=u), t_star, np.ones_like(t_star), starts, lower, upper)[0]


class QuadraticLaw:
    """y = a + b·s + c·s² with s = x or log x, fitted by least squares in y.

    Internally s is standardised (u = (s - mean)/std) so the normal equations
    stay well conditioned for large x such as FLOPs or parameter counts.
    """

    fit_space = "linear"
    decreasing = False
    n_inputs = 1
    param_names = ("a", "b", "c")

    def __init__(self, log_x: bool):
        self.name, self.uses_log_x = "quadratic", log_x

    def _s(self, x: np.ndarray) -> np.ndarray:
        return np.log(x[:, 0]) if self.uses_log_x else x[:, 0]

    def center(self, x: np.ndarray) -> np.ndarray:
        s = self._s(x)
        return np.array([s.mean(), s.std()])

    def features(self, x: np.ndarray, center: np.ndarray) -> np.ndarray:
        return (self._s(x) - center[0]) / center[1]

    @staticmethod
    def to_fit_space(z: np.ndarray) -> np.ndarray:
        return z

    @staticmethod
    def from_fit_space(t: np.ndarray) -> np.ndarray:
        return t

    @staticmethod
    def _design(u: np.ndarray) -> np.ndarray:
        return np.column_stack([np.ones_like(u), u, u * u])

    def predict(self, theta: np.ndarray, u: np.ndarray) -> np.ndarray:
        return theta[:, :1] + theta[:, 1:2] * u + theta[:, 2:3] * u * u

    def natural(self, theta: np.ndarray, center: np.ndarray) -> np.ndarray:
        m, sd = center
        a, b, c = theta.T
        return np.column_stack([a - b * m / sd + c * m * m / sd**2,
                                b / sd - 2 * c * m / sd**2,
                                c / sd**2])

    def vertex(self, theta: np.ndarray, center: np.ndarray) -> np.ndarray:
        """x at the stationary point of each parameter row (NaN where the curve is a line)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            u = -theta[:, 1] / (2 * theta[:, 2])
        s = center[0] + center[1] * u
        with np.errstate(over="ignore"):  # a nearly flat resample's vertex is far out: inf
            return np.exp(s) if self.uses_log_x else s

    def fit(self, u: np.ndarray, t: np.ndarray) -> np.ndarray:
        return weighted_lstsq(self._design(u), t, np.ones((1, len(t))))[0]

    def fit_resamples(self, u: np.ndarray, t_star: np.ndarray, start: np.ndarray) -> np.ndarray:
        return weighted_lstsq(self._design(u), t_star, np.ones_like(t_star))


POWER_LAWS = {
    "power": PowerSumLaw("power", (Term("A", "alpha", 0),), 1),
    "saturating_power": PowerSumLaw("saturating_power", (Term("E"), Term("A", "alpha", 0)), 1),
    "chinchilla": PowerSumLaw("chinchilla", (Term("E"), Term("A", "alpha", 0), Term("B", "beta", 1)), 2),
}
LAW_NAMES = (*POWER_LAWS, "quadratic")


def get_law(name: str, log_x: bool = False) -> PowerSumLaw | QuadraticLaw:
    """The law called `name`; log_x only matters for the quadratic."""
    if name == "quadratic":
        return QuadraticLaw(log_x)
    if name not in POWER_LAWS:
        raise ValueError(f"unknown law {name!r}; choose one of {', '.join(LAW_NAMES)}")
    return POWER_LAWS[name]
