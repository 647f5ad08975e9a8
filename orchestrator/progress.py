"""The live, quiet view of a study in the terminal.

Trials done, running, stopped early, diverged and failed; the best objective so
far per cell; compute spent against planned; an ETA from the compute rate.
Ray's own tables and logs go to a log file instead (see campaign.quiet_ray).
"""
from __future__ import annotations

import time
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from ray.tune import Callback

from orchestrator.planning import Plan
from orchestrator.results import trial_status


def _eng(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.3g} "


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class StudyProgress(Callback):
    def __init__(self, plan: Plan, name: str, console: Optional[Console] = None, done: Optional[dict] = None):
        self.plan, self.name = plan, name
        self.metric, self.mode = plan.study.objective.metric, plan.study.objective.mode
        self.console = console or Console()
        self.status: dict[str, str] = dict(done or {})  # trial id -> status
        self.flops: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.started = time.time()
        self.live: Optional[Live] = None

    def __getstate__(self):
        return {}  # see TrialRecorder.__getstate__

    # -- Tune callback hooks
    def setup(self, **info):
        if self.console.is_terminal:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.status[trial.trial_id] = "running"
        self._changed(f"started {trial.config['cell']} #{trial.config['replicate']}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.flops[trial.trial_id] = float(result.get("flops", 0.0))
        value = result.get(self.metric)
        if value is not None:
            cell = trial.config["cell"]
            better = max if self.mode == "max" else min
            self.best[cell] = better(self.best.get(cell, value), value)
        self._changed(None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, errored=True)

    def on_experiment_end(self, trials, **info):
        if self.live is not None:
            self.live.update(self.render())
            self.live.stop()
        else:
            self.console.print(self.summary_line())

    # -- rendering
    def _ended(self, trial, errored: bool) -> None:
        status = trial_status(trial.last_result, errored)
        self.status[trial.trial_id] = status
        self._changed(f"{status.replace('_', ' ')}: {trial.config['cell']} #{trial.config['replicate']}")

    def _changed(self, event: Optional[str]) -> None:
        if self.live is not None:
            self.live.update(self.render())
        elif event:  # not a terminal (CI, a log file): one line per event
            self.console.print(f"{event}  |  {self.summary_line()}")

    def counts(self) -> dict[str, int]:
        keys = ("running", "finished", "stopped_early", "diverged", "failed")
        return {k: sum(s == k for s in self.status.values()) for k in keys}

    def spent(self) -> float:
        return sum(self.flops.values())

    def eta(self) -> Optional[float]:
        spent, planned = self.spent(), self.plan.total_flops
        elapsed = time.time() - self.started
        if spent <= 0 or elapsed <= 0:
            return None
        return max(0.0, (planned - spent) * elapsed / spent)

    def summary_line(self) -> str:
        c = self.counts()
        done = c["finished"] + c["stopped_early"] + c["diverged"] + c["failed"]
        eta = self.eta()
        return (f"{done}/{self.plan.trials} done ({c['finished']} finished, {c['stopped_early']} stopped early, "
                f"{c['diverged']} diverged, {c['failed']} failed), {c['running']} running; "
                f"compute {_eng(self.spent())}FLOP of {_eng(self.plan.total_flops)}FLOP; "
                f"elapsed {_duration(time.time() - self.started)}"
                + (f", ETA {_duration(eta)}" if eta is not None else ""))

    def render(self) -> Group:
        table = Table(title=f"{self.name}: best {self.metric} ({self.mode}) per cell", expand=False)
        table.add_column("cell")
        table.add_column(self.metric, justify="right")
        for cell in self.plan.cells:
            v = self.best.get(cell.id)
            table.add_row(cell.id, "-" if v is None else f"{v:.4g}")
        return Group(table, Text(self.summary_line()))
