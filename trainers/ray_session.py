"""Starting or joining Ray, the same way for every entry point."""
from __future__ import annotations

import logging
import os
import socket
from typing import Optional

import ray

from trainers.resources import wait_passively


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: Optional[str] = None, **kwargs) -> None:
    """Join the cluster at `address`, or start Ray in this process.

    A Ray started here gets its dashboard on a port chosen now, announced to
    every Ray process through RAY_API_SERVER_ADDRESS (they inherit this
    environment). Ray Train's placement-group cleaner asks the state API
    whether a run's controller is still alive; without the address, a second
    Ray instance on the machine makes that lookup fail, and the workers'
    CPUs of a trial stopped early are never released.
    """
    if ray.is_initialized():
        return
    kwargs.setdefault("logging_level", logging.WARNING)
    if address is None:
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # A trial starts several processes (trial driver, Train controller, workers);
        # Ray's default of one process start per CPU queues concurrent trials' starts
        # behind each other and prints a warning about it on the terminal.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(8, os.cpu_count() or 1)))
        # Train v2 starts a watcher process per run for spot-node preemption notices;
        # this machine is not preemptible, and the process costs seconds per trial.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        wait_passively()  # the workers inherit it: their OpenMP threads do not spin
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **kwargs)
    else:
        context = ray.init(address=address, **kwargs)
        # The joined cluster's own dashboard: one inherited from another Ray
        # (a parent process that started its own) would point the state API,
        # and so the placement-group sweeper, at the wrong cluster.
        if context.dashboard_url:
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{context.dashboard_url}"
        else:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
