"""Step metrics that never make the training loop wait.

Ray Train's report is a barrier polled by the controller (seconds per call), so
only evaluation points and checkpoints go through it. Per-step curves go to
MLflow with asynchronous logging (a background queue), and optionally to the
console.
"""
from __future__ import annotations

import time
from typing import Optional

from rich.console import Console


class StepLog:
    def __init__(self, tracking: Optional[dict] = None, echo: bool = False, total_steps: int = 0):
        self._client = None
        self._run_id = None
        self._pending = []
        if tracking:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking["uri"])
            self._run_id = tracking["run_id"]
        self._console = Console(stderr=False, highlight=False) if echo else None
        self._total = total_steps

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self._pending.append(self._client.log_batch(self._run_id, metrics=batch, synchronous=False))
        if self._console is not None:
            parts = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            self._console.print(f"step {step}/{self._total}  {parts}")

    def close(self) -> None:
        """Wait for queued MLflow writes, so that a finished run has all its points."""
        for op in self._pending:
            op.wait()
        self._pending.clear()


def _fmt(v: float) -> str:
    return f"{v:.3e}" if abs(v) >= 1e5 or (v and abs(v) < 1e-3) else f"{v:.4g}"
