"""Which trials make the points of a curve.

A point answers "the best this cell can do": the cell's best tuned
configuration, with its spread from seeds of that configuration, which no
scheduler stops (design.md, "What a point on a curve is"). A trial that an
early-stopping rule ended never defines a point. Where the curve's x is the
very thing the tuning searches (a mask-ratio sweep), every trial that trained
to its budget is a point, and the study may not stop any early.
"""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

# Columns derived from a training setting: a curve over them follows that setting.
DERIVED_FROM = {"effective_mask_ratio": ("mask_ratio",), "seq_len": ("img_size", "patch_size")}


def x_is_searched(spec, tuned: Iterable[str]) -> bool:
    tuned = set(tuned)
    return any(col in tuned or tuned & set(DERIVED_FROM.get(col, ())) for col in spec.x_columns)


def tuned_names(frame: pd.DataFrame) -> list[str]:
    return [c.removeprefix("tuned.") for c in frame.columns if c.startswith("tuned.")]


def point_trials(frame: pd.DataFrame, spec, metric: str, mode: str) -> tuple[pd.DataFrame, str]:
    """The rows of the results table that make `spec`'s points, and how they were chosen.

    `metric`/`mode` is the study's objective, which picks a cell's best configuration
    (the curve's y may be another metric). Seeds that the study ran name the tuning
    trial they repeat (`seed_of`): that choice is kept, so the curve shows the
    configuration whose seeds were paid for.
    """
    tuned = tuned_names(frame)
    if "role" not in frame.columns:  # a table from before roles: tuned trials are tuning ones
        frame = frame.assign(role="tune" if tuned else "seed", seed_of=None)
    finished = frame[frame["status"] == "finished"]
    if x_is_searched(spec, tuned):
        return finished, "every trial that trained to its budget (x is what the tuning searches)"
    if not tuned:
        return finished, "every seed of each cell"
    picked = []
    for _, part in finished.groupby("cell", sort=False):
        repeated = part["seed_of"].dropna()
        if len(repeated):
            best = repeated.iloc[0]
        else:
            tuning = part[(part["role"] == "tune")].dropna(subset=[metric])
            if tuning.empty:
                continue
            best = tuning.loc[tuning[metric].idxmax() if mode == "max" else tuning[metric].idxmin(), "trial_id"]
        picked.append(part[(part["trial_id"] == best) | (part["seed_of"] == best)])
    rows = pd.concat(picked) if picked else finished.iloc[:0]
    return rows, (f"each cell's best tuned configuration by {metric} ({mode}) that trained to its budget, "
                  f"with its seeds; early-stopped trials never define a point")
