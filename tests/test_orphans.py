"""Placement groups whose creator actor died are released; every other one is left alone."""

from __future__ import annotations

import time

import pytest
from ray.core.generated import gcs_pb2

from cbtlab.tune.orphans import orphaned, release_orphaned_placement_groups

Table = gcs_pb2.PlacementGroupTableData
DRIVER = b"\xff" * 16


def _group(n: int, creator: bytes, *, dead: bool, state=Table.CREATED, detached=False) -> Table:
    return Table(
        placement_group_id=bytes([n]) * 18,
        creator_actor_id=creator,
        creator_actor_dead=dead,
        state=state,
        is_detached=detached,
    )


def test_only_groups_of_dead_actors_are_orphans() -> None:
    actor = b"\x01" * 16
    table = [
        _group(1, actor, dead=True),  # the orphan
        _group(2, actor, dead=True, state=Table.RESCHEDULING),  # its bundles on a lost node
        _group(3, actor, dead=False),  # a live controller's
        _group(4, DRIVER, dead=True),  # the driver's (Tune's trial groups): the GCS says dead
        _group(5, actor, dead=True, detached=True),  # outlives its creator by design
        _group(6, actor, dead=True, state=Table.REMOVED),
    ]
    assert orphaned(table) == [bytes([1]) * 18, bytes([2]) * 18]


@pytest.mark.ray
def test_a_dead_actors_group_is_removed_and_a_live_ones_kept(ray_session: None) -> None:
    import ray
    from ray.util.placement_group import placement_group_table

    @ray.remote(num_cpus=0)
    class Creator:
        def reserve(self) -> str:
            group = ray.util.placement_group([{"CPU": 0.01}])
            ray.get(group.ready(), timeout=60)
            return group.id.hex()

    doomed, living = Creator.remote(), Creator.remote()
    lost, kept = ray.get([doomed.reserve.remote(), living.reserve.remote()])
    own = ray.util.placement_group([{"CPU": 0.01}])  # the driver's, as Tune's trial groups
    ray.get(own.ready(), timeout=60)
    ray.kill(doomed)
    deadline = time.monotonic() + 30
    released: list[str] = []
    while lost not in released and time.monotonic() < deadline:
        released += release_orphaned_placement_groups()  # the GCS marks the death shortly
        time.sleep(0.2)
    assert lost in released and kept not in released and own.id.hex() not in released
    states = {k: v["state"] for k, v in placement_group_table().items()}
    assert states[lost] == "REMOVED"
    assert states[kept] == states[own.id.hex()] == "CREATED"
    ray.kill(living)
    ray.util.remove_placement_group(own)
    release_orphaned_placement_groups()
