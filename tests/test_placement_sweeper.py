"""The sweeper frees placement groups that hold CPUs with no actor in them (real Ray)."""
import time

from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.placement_sweeper import PlacementGroupSweeper


def _state(pg) -> str:
    return placement_group_table(pg)["state"]


def test_empty_group_is_removed_at_the_second_look_and_a_used_one_stays(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=1)
    class Holder:
        def ping(self):
            return 1

    leaked = placement_group([{"CPU": 1}])
    used = placement_group([{"CPU": 1}])
    driver_like = placement_group([{"memory": 2 ** 20}])  # a Tune trial driver's: never swept
    ray.get([leaked.ready(), used.ready(), driver_like.ready()])
    holder = Holder.options(scheduling_strategy=PlacementGroupSchedulingStrategy(used)).remote()
    assert ray.get(holder.ping.remote()) == 1
    try:
        sweeper = PlacementGroupSweeper(every_s=0)
        # through the hook Tune calls after each step of its loop
        sweeper.on_step_end(iteration=0, trials=[])  # first look: noted, nothing removed yet
        assert _state(leaked) == "CREATED" and sweeper.removed == []
        sweeper.on_step_end(iteration=1, trials=[])
        assert sweeper.removed == [leaked.id.hex()]
        assert _state(driver_like) == "CREATED"
        deadline = time.time() + 10
        while _state(leaked) != "REMOVED" and time.time() < deadline:
            time.sleep(0.1)
        assert _state(leaked) == "REMOVED"
        assert _state(used) == "CREATED"
        while ray.available_resources().get("CPU", 0) < 1 and time.time() < deadline + 10:
            time.sleep(0.1)  # the resource view follows the removal within a moment
        assert ray.available_resources().get("CPU", 0) >= 1  # the leaked CPU is free again
    finally:
        ray.kill(holder)
        remove_placement_group(used)
        remove_placement_group(driver_like)
