"""`status NAME`: where a study stands, from what is in storage."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from orchestrator.results import STATUSES, ResultsTable
from orchestrator.saved_state import objective_of, read_state
from orchestrator.storage import Storage


def print_status(name: str, storage_uri: str, console: Console) -> None:
    state = read_state(name, storage_uri)
    rows = list(ResultsTable(Storage(storage_uri), name).rows.values())
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    spent = sum(r["flops"] or 0.0 for r in rows)
    objective = objective_of(state)
    metric, mode = objective.metric, objective.mode
    console.print(f"[bold]{name}[/bold] ({state['profile']}): {len(rows)}/{state['trials']} trials ended: "
                  + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items()))
    console.print(f"compute spent {spent:.3g} of {state['planned_flops']:.3g} planned FLOPs")
    if len(rows) < state["trials"]:
        console.print(f"not complete: `python -m orchestrator resume {name}` continues it")
    table = Table(title=f"best {metric} ({mode}) per cell")
    table.add_column("cell")
    table.add_column("trials", justify="right")
    table.add_column(metric, justify="right")
    pick = max if mode == "max" else min
    for cell in sorted({r["cell"] for r in rows}):
        values = [r[metric] for r in rows if r["cell"] == cell and r[metric] is not None]
        n = sum(r["cell"] == cell for r in rows)
        table.add_row(cell, str(n), f"{pick(values):.4g}" if values else "-")
    console.print(table)
