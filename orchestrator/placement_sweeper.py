"""Frees the CPUs of placement groups that outlived their Train run.

Ray Train v2 removes a run's worker placement group when its controller ends,
and a detached cleaner actor removes it when the controller dies instead. When
Tune stops a trial early it kills the trial's driver and with it the controller;
on this machine the group has then been seen to survive both paths, keeping its
CPUs reserved, and the next trials waited for workers forever. This Tune
callback looks, every `every_s` seconds, for placement groups of this study's
Ray job that reserve CPUs or GPUs and in which no actor lives, and removes
those still empty at the next look. A group that is about to receive its
actors is empty for a moment, never for a whole interval. Tune's own groups
for trial drivers reserve neither (see campaign.driver_resources), so a trial
waiting to start is never swept.
"""
from __future__ import annotations

import logging
import time

import ray
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.state import list_actors, list_placement_groups

logger = logging.getLogger(__name__)

SWEEP_EVERY_S = 15.0


def _reserves_compute(group) -> bool:
    return any({"CPU", "GPU"} & set(b.get("unit_resources", {})) for b in group.bundles or [])


def empty_placement_groups(job_id: str) -> set[str]:
    """Ids of the job's CREATED placement groups that reserve CPUs or GPUs and hold no live actor."""
    groups = {g.placement_group_id for g in list_placement_groups(
        filters=[("state", "=", "CREATED")], detail=True, limit=10_000)
        if g.creator_job_id == job_id and _reserves_compute(g)}
    used = {a.placement_group_id for a in list_actors(
        filters=[("state", "!=", "DEAD")], detail=True, limit=10_000) if a.placement_group_id}
    return groups - used


class PlacementGroupSweeper(Callback):
    def __init__(self, every_s: float = SWEEP_EVERY_S):
        self._every_s = every_s
        self._last = time.monotonic()
        self._empty: set[str] = set()
        self.removed: list[str] = []

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self._last >= self._every_s:
            self.sweep()

    def sweep(self) -> None:
        self._last = time.monotonic()
        try:
            empty = empty_placement_groups(ray.get_runtime_context().get_job_id())
        except Exception as err:  # the state API can be briefly unavailable; look again later
            logger.warning("placement group sweep skipped: %s", err)
            return
        for group_id in sorted(empty & self._empty):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
            self.removed.append(group_id)
            logger.warning("removed placement group %s: it held resources and no actor for %.0f s or more",
                           group_id, self._every_s)
        self._empty = empty - set(self.removed)
