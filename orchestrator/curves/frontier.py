"""Compute-efficient frontier: the best objective reached at or below each compute."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .fit import json_number


@dataclass(frozen=True)
class FrontierPoint:
    compute: float
    objective: float
    group: str


@dataclass
class Frontier:
    """Pareto points in increasing compute, each strictly better than all cheaper ones."""
    points: list[FrontierPoint]
    higher_is_better: bool

    @property
    def groups(self) -> list[str]:
        """Groups that own at least one frontier point, in order of first appearance."""
        return list(dict.fromkeys(p.group for p in self.points))

    def best_at(self, compute: float) -> FrontierPoint | None:
        """The best point with compute <= `compute` (None below the cheapest point)."""
        cheaper = [p for p in self.points if p.compute <= compute]
        return cheaper[-1] if cheaper else None

    def to_dict(self) -> dict[str, Any]:
        return {"higher_is_better": self.higher_is_better, "groups": self.groups,
                "points": [{"compute": json_number(p.compute), "objective": json_number(p.objective),
                            "group": p.group} for p in self.points]}


def compute_frontier(compute, objective, group=None, *, higher_is_better: bool = False) -> Frontier:
    """The envelope of (compute, objective) points across groups; NaN objectives are ignored."""
    compute = np.asarray(compute, dtype=float)
    objective = np.asarray(objective, dtype=float)
    groups = ["all"] * len(compute) if group is None else [str(g) for g in group]
    score = -objective if higher_is_better else objective  # lower score is better
    order = np.lexsort((score, compute))  # by compute, best first within equal compute
    points, best = [], np.inf
    for i in order:
        if np.isfinite(score[i]) and score[i] < best:
            best = score[i]
            points.append(FrontierPoint(float(compute[i]), float(objective[i]), groups[i]))
    return Frontier(points=points, higher_is_better=higher_is_better)
