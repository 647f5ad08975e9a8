"""Restarts a trial that has gone silent, so that one hung process cannot hold a
study forever.

Seen once on Ray 2.60: a trial's Tune actor blocked for good inside Ray's own
`_TrainSession.get_next` -> `report` -> `result_queue.put`, its Train run
already over, and Tune's loop waited on it with no end (docs/reliability.md).
A hung Train worker holds a study the same way: Train notices one only after
its 10-minute health check, and a hung Tune actor not at all.

A trial is heard from when it starts, when Tune gets a result from it, and
when its training sends step metrics to its relay (orchestrator/relay.py,
every `log_every_steps`). One not heard from for `limit_s`, far longer than a
step, an evaluation or a checkpoint upload takes, has its Tune actor killed:
Tune counts that as a failure of the trial and, within FailureConfig's
max_failures, starts it again, and its Train run continues from its latest
checkpoint (a run that had ended only reports its end again).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import ray
from ray.tune import Callback
from ray.tune.experiment import Trial
from rich.console import Console

from orchestrator.relay import relay_name

logger = logging.getLogger(__name__)

RELAY_ANSWER_S = 5.0  # a relay only queues what it gets: it answers at once


class SilentTrialWatchdog(Callback):
    def __init__(self, study: str, limit_s: float, console: Optional[Console] = None):
        self.study, self.limit_s = study, limit_s
        self.console = console or Console()
        self.heard: dict[str, float] = {}  # trial id -> when it was last heard from (time.time())
        self.every_s = min(10.0, limit_s / 4)
        self.checked = time.monotonic()

    def __getstate__(self):
        return {}  # see TrialRecorder.__getstate__

    def on_trial_start(self, iteration, trials, trial, **info):
        self.heard[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.heard[trial.trial_id] = time.time()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.checked < self.every_s:
            return
        self.checked = time.monotonic()
        running = [t for t in trials if t.status == Trial.RUNNING and t.temporary_state.ray_actor is not None]
        for trial, step_metrics_at in zip(running, self._relays_heard(running)):
            heard = max(self.heard.setdefault(trial.trial_id, time.time()), step_metrics_at or 0.0)
            if time.time() - heard > self.limit_s:
                self._restart(trial, time.time() - heard)

    def _relays_heard(self, trials: list) -> list[Optional[float]]:
        """When each trial's training last sent step metrics, where its relay answers."""
        refs = []
        for trial in trials:
            try:
                refs.append(ray.get_actor(relay_name(self.study, trial.trial_id)).last_heard.remote())
            except ValueError:  # no relay yet: the trial has only just started
                refs.append(None)
        pending = [r for r in refs if r is not None]
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=RELAY_ANSWER_S) if pending else ([], [])
        answers = {}
        for ref in ready:
            try:
                answers[ref] = ray.get(ref)
            except ray.exceptions.RayError:  # the relay died: Tune's own signs remain
                pass
        return [answers.get(r) if r is not None else None for r in refs]

    def _restart(self, trial, silent_s: float) -> None:
        self.heard[trial.trial_id] = time.time()  # once: Tune's restart of it is heard as a start
        message = (f"trial {trial.trial_id} ({trial.config['cell']} #{trial.config['replicate']}) silent for "
                   f"{silent_s:.0f} s: stopped, for Tune to start it again from its latest checkpoint")
        logger.warning(message)
        self.console.print(f"warning: {message}")
        ray.kill(trial.temporary_state.ray_actor, no_restart=True)
