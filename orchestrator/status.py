"""`status NAME`: where a study stands, from what is in storage (study.json,
results.parquet and the fitted curves' JSON), without Ray."""
from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.table import Table

from orchestrator.saved_state import curves_of, objective_of, plan_of, read_state
from orchestrator.storage import RESULTS_FILE, Storage

# what a cell's rows need when no trial has ended yet
EMPTY_COLUMNS = ("trial_id", "cell", "role", "status", "flops")


def cell_state(rows: pd.DataFrame, trials_per_cell: int, replicates: int) -> str:
    """"complete", "complete, no seeds" or "not complete", from one cell's ended trials.

    A cell none of whose tuning trials trained to its budget has no
    configuration to repeat, so it gets no seeds and is complete without them.
    """
    if len(rows) == trials_per_cell + replicates:
        return "complete"
    tuning = rows[rows["role"] == "tune"]
    if replicates and len(tuning) == trials_per_cell and not (tuning["status"] == "finished").any():
        return "complete, no seeds"
    return "not complete"


def _flops(x: float) -> str:
    return f"{x:.3g}"


def _best(rows: pd.DataFrame, metric: str, mode: str) -> tuple[str, str]:
    """Best objective among the cell's trials that trained to their budget, and its trial."""
    done = rows[(rows["status"] == "finished") & rows[metric].notna()] if metric in rows else rows.iloc[:0]
    if done.empty:
        return "-", "-"
    best = done.loc[done[metric].idxmax() if mode == "max" else done[metric].idxmin()]
    return f"{best[metric]:.4g}", str(best["trial_id"])


def cells_table(name: str, trials: pd.DataFrame, state: dict) -> tuple[Table, bool]:
    """One row per planned cell; and whether every cell is complete."""
    plan = plan_of(state)
    objective = objective_of(state)
    metric, mode = objective.metric, objective.mode
    per_cell = plan["trials_per_cell"] + plan["replicates"]
    table = Table(title=f"{name}: cells (best {metric}, {mode}, among trials that trained to their budget)")
    for col, justify in (("cell", "left"), ("trials", "right"), ("state", "left"), (metric, "right"),
                         ("trial", "left"), ("FLOPs spent / planned", "right")):
        table.add_column(col, justify=justify)
    complete = True
    for cell, flops_per_trial in plan["cell_flops_per_trial"].items():
        rows = trials[trials["cell"] == cell]
        state_text = cell_state(rows, plan["trials_per_cell"], plan["replicates"])
        complete &= state_text != "not complete"
        value, trial = _best(rows, metric, mode)
        spent = float(rows["flops"].fillna(0).sum())
        table.add_row(cell, f"{len(rows)}/{per_cell}", state_text, value, trial,
                      f"{_flops(spent)} / {_flops(flops_per_trial * per_cell)}")
    return table, complete


def _interval(ci) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci and None not in ci else ""


def curve_lines(curve: dict) -> list[str]:
    """The headline of one fitted curve (its <curve>.json): each group's law
    parameters with their intervals, optimum and turning point, and for a
    compute-optimal curve the exponents of its optimum against compute."""
    spec = curve["spec"]
    lines = [f"{curve['curve']}: {spec['y']} vs {spec['x']}" + (f", law {spec['law']}" if spec["law"] else "")]
    if curve["error"]:
        lines.append(f"  {curve['error']}")
    groups = list(curve["groups"].values()) + ([curve["frontier_fit"]] if curve["frontier_fit"] else [])
    for g in groups:
        fit = g["fit"]
        if fit is None:
            why = f"not fitted: {g['error']}" if g["error"] else f"{g['n_trials']} points, no law"
            lines.append(f"  {g['group']}: {why}")
            continue
        params = ", ".join(f"{k}={v:.3g} {_interval(fit['ci'].get(k))}".rstrip() for k, v in fit["params"].items())
        line = f"  {g['group']}: {params}" + (f" ({fit['interval_note']})" if fit["interval_note"] else "")
        if fit.get("vertex"):
            line += f"; optimum at {fit['vertex']['x']:.4g} {_interval(fit['vertex']['ci'])}"
        if g["turning_point"]:
            tp = g["turning_point"]
            line += (f"; turning point at {tp['x']:.4g} {_interval(tp['ci'])}"
                     + ("" if tp["confident"] else " (not confident)"))
        lines.append(line)
    iso = curve.get("isoflop")
    for what, law in (("optimal size", iso and iso["n_opt_law"]), ("images seen", iso and iso["d_opt_law"])):
        if law:
            lines.append(f"  {what} at the optimum ~ compute^{law['a']:.3g} {_interval(law['a_ci'])}")
    return lines


def print_status(name: str, storage_uri: str, console: Console) -> None:
    state = read_state(name, storage_uri)
    storage = Storage(storage_uri)
    if storage.exists(name, RESULTS_FILE):
        trials = storage.read_table(f"{name}/{RESULTS_FILE}").to_pandas()
    else:
        trials = pd.DataFrame(columns=EMPTY_COLUMNS)
    counts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in trials["status"].value_counts().items())
    table, complete = cells_table(name, trials, state)
    spent = float(trials["flops"].fillna(0).sum())
    console.print(f"[bold]{name}[/bold] ({state['profile']}): {'complete' if complete else 'not complete'}; "
                  f"{len(trials)} of {state['trials']} planned trials ended" + (f" ({counts})" if counts else "")
                  + f"; compute {_flops(spent)} of {_flops(state['planned_flops'])} planned FLOPs")
    console.print(table)
    if not complete:
        console.print(f"`python -m orchestrator resume {name}` continues it")
    for spec in curves_of(state):
        rel = f"{name}/curves/{spec.name}.json"
        if storage.exists(rel):
            console.print("\n".join(curve_lines(storage.read_json(rel))), highlight=False)
        else:
            console.print(f"{spec.name}: not fitted yet (`python -m orchestrator fit {name}`)")
