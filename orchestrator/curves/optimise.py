"""Batched minimisers: many independent fits of one model solved at once.

Bootstrap resamples and grid starting points are all the same small problem
with different weights or starts, so they are stacked along a leading batch
axis and advanced together with numpy instead of looping over scipy calls.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.optimize import minimize

# Model: raw parameters (B, p) -> predictions (B, n) and Jacobian (B, n, p).
Model = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

HUBER_DELTA = 1e-3  # Chinchilla / Besiroglu et al. 2024, on log residuals
OUTSIDE_CURVATURE = 1e-3  # fraction of the IRLS weight 1/|r| kept for residuals beyond delta


def huber_loss(r: np.ndarray, weights: np.ndarray, delta: float) -> np.ndarray:
    """Weighted Huber loss summed over the last axis, divided by delta.

    Dividing by delta keeps gradients O(1) (the loss is almost L1 at this
    delta) without moving the minimum.
    """
    a = np.abs(r)
    rho = np.where(a <= delta, r * r / (2 * delta), a - delta / 2)
    return (weights * rho).sum(-1)


def huber_lm(model: Model, target: np.ndarray, weights: np.ndarray, start: np.ndarray,
             lower: np.ndarray, upper: np.ndarray, delta: float = HUBER_DELTA,
             max_iter: int = 500, rtol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the weighted Huber loss for a batch of independent problems.

    Levenberg-Marquardt with the Huber loss's own curvature: 1/delta for
    residuals inside delta, plus a small IRLS-like weight outside so the system
    stays solvable while fewer than p residuals are inside (plain IRLS weights
    converge far more slowly at this almost-L1 delta). A step is kept only
    where it lowers that problem's loss, so each problem descends
    monotonically; problems leave the batch as they converge. Returns raw
    parameters (B, p) and losses (B,).
    """
    theta = np.array(start, dtype=float)
    weights = np.broadcast_to(weights, (theta.shape[0], target.shape[-1]))
    target = np.broadcast_to(target, weights.shape)  # one target per problem, or one for all
    pred, jac = model(theta)
    resid = pred - target
    loss = huber_loss(resid, weights, delta)
    damping = np.full(theta.shape[0], 1e-3)
    eye = np.eye(theta.shape[1])
    active = np.arange(theta.shape[0])
    for _ in range(max_iter):
        w, r, j, lam = weights[active], resid[active], jac[active], damping[active]
        inside = np.abs(r) <= delta
        curvature = w * np.where(inside, 1 / delta, OUTSIDE_CURVATURE / np.maximum(np.abs(r), delta))
        hess = (j * curvature[..., None]).transpose(0, 2, 1) @ j
        grad = (j * (w * np.clip(r / delta, -1, 1))[..., None]).sum(1)
        diag = np.diagonal(hess, axis1=1, axis2=2)
        damped = hess + (lam[:, None] * diag + 1e-12)[:, :, None] * eye
        step = np.linalg.solve(damped, -grad[..., None])[..., 0]
        trial = np.clip(theta[active] + step, lower, upper)
        trial_pred, trial_jac = model(trial)
        trial_resid = trial_pred - target[active]
        trial_loss = huber_loss(trial_resid, w, delta)
        better = trial_loss <= loss[active]
        done = (better & (loss[active] - trial_loss <= rtol * np.maximum(loss[active], 1.0))) | (lam > 1e8)
        kept = active[better]
        theta[kept], resid[kept], jac[kept], loss[kept] = (
            trial[better], trial_resid[better], trial_jac[better], trial_loss[better])
        damping[active] = np.where(better, np.maximum(lam / 3, 1e-9), lam * 4)
        active = active[~done]
        if active.size == 0:
            break
    return theta, loss


def huber_lbfgs(model: Model, target: np.ndarray, start: np.ndarray,
                lower: np.ndarray, upper: np.ndarray,
                delta: float = HUBER_DELTA) -> tuple[np.ndarray, float]:
    """One unweighted Huber fit with scipy L-BFGS-B and the analytic gradient."""
    def objective(theta):
        pred, jac = model(theta[None])
        r = pred[0] - target
        psi = np.clip(r / delta, -1, 1)
        return float(huber_loss(r, 1.0, delta)), psi @ jac[0]

    bounds = [(None if np.isinf(lo) else lo, None if np.isinf(hi) else hi)
              for lo, hi in zip(lower, upper)]
    res = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10})
    return res.x, float(res.fun)


def weighted_lstsq(design: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Batched weighted least squares via the normal equations.

    design (n, p), target (n,) or (B, n), weights (B, n) -> coefficients (B, p);
    NaN where a resample leaves the system singular (too few distinct x).
    """
    xtwx = np.einsum("bn,ni,nj->bij", weights, design, design)
    xtwy = np.einsum("bn,ni,bn->bi", weights, design, np.broadcast_to(target, weights.shape))
    singular = np.linalg.cond(xtwx) > 1e12
    xtwx[singular] = np.eye(design.shape[1])
    coef = np.linalg.solve(xtwx, xtwy[..., None])[..., 0]
    coef[singular] = np.nan
    return coef
