"""Step metrics that never make the training loop wait.

Ray Train's report is a barrier polled by the controller, so only evaluation
points and checkpoints go through it. Per-step curves go to a `sink`: any Ray
actor handle with a `log(step, metrics)` method, called fire-and-forget (the
orchestrator passes one that writes to MLflow from the driver's node, the only
place a cluster's tracking server is sure to be reachable). With `echo`, rank 0
also prints a progress line.
"""
from __future__ import annotations

from typing import Any, Optional

import ray
from rich.console import Console


class StepLog:
    def __init__(self, sink: Optional[Any] = None, echo: bool = False, total_steps: int = 0):
        self._sink = sink
        self._console = Console(highlight=False) if echo else None
        self._total = total_steps

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._sink is not None:
            self._sink.log.remote(step, {k: float(v) for k, v in metrics.items()})
        if self._console is not None:
            parts = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            self._console.print(f"step {step}/{self._total}  {parts}")

    def close(self) -> None:
        """Wait until the sink has received every point (calls from one caller run
        in order); writing them on is the sink's business, not the run's."""
        if self._sink is not None:
            ray.get(self._sink.received.remote())


def _fmt(v: float) -> str:
    return f"{v:.3e}" if abs(v) >= 1e5 or (v and abs(v) < 1e-3) else f"{v:.4g}"
