"""Placement groups left behind by trials whose node died, released while the study runs.

Each trial's Ray Train controller reserves its training workers' resources in a placement group
that the controller creates, so the group lives as long as the job (the study's driver), not as
long as the controller. Ray Train removes it when the controller ends, or, when the controller
dies, through a cleaner actor that learns of the group only once the worker group has started
(`PlacementGroupCleanerCallback.after_worker_group_start`, Ray 2.60). A node lost while a trial's
worker group is starting (seconds on a loaded machine, longer on GPUs) therefore leaves its
group reserved until the study ends: on the surviving nodes (Ray reschedules the lost bundles)
it holds CPUs and GPUs that no worker uses, and the trials Tune runs again wait for them
forever. Seen on a two-node cluster (tests/test_multinode.py): the head's 2 CPUs held by two
such groups, three trials waiting.

`release_orphaned_placement_groups` removes every group whose creator was an actor that has
died (never a detached group, nor one created by a driver): nothing can use such a group any
more, and Ray would remove it itself once the job ended. The GCS records the creator and its
death (`PlacementGroupTableData.creator_actor_dead`) but no public API returns them, hence the
internal accessor; where it is missing (another Ray release) this does nothing and says so once.
`PlacementGroupSweeper` runs it from the Tune driver's loop every few seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)

# Seconds between two sweeps of the placement-group table (one GCS call each).
SWEEP_EVERY_S = 10.0


def orphaned(table: list[Any]) -> list[bytes]:
    """The ids of the placement groups in `table` (`PlacementGroupTableData` messages) whose
    creator actor has died: not removed yet, not detached, created by an actor (a driver's id
    is all 0xff bytes)."""
    ids = []
    for group in table:
        by_driver = set(group.creator_actor_id) <= {0xFF}
        removed = group.state == type(group).REMOVED
        if group.creator_actor_dead and not (by_driver or group.is_detached or removed):
            ids.append(bytes(group.placement_group_id))
    return ids


def release_orphaned_placement_groups() -> list[str]:
    """Remove the placement groups of the connected Ray cluster whose creator actor has died
    (`orphaned`); their ids (hex). Does nothing where Ray's internal table cannot be read."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = _placement_group_table()
    released = []
    for raw_id in orphaned(table or []):
        group_id = ray.PlacementGroupID(raw_id)
        try:
            remove_placement_group(PlacementGroup(group_id))
        except Exception as exc:  # removed meanwhile, or the GCS busy: the next sweep sees it
            log.debug("could not remove placement group %s: %s", group_id.hex(), exc)
            continue
        released.append(group_id.hex())
    return released


_UNREADABLE: list[str] = []  # the reason, once the table turned out unreadable


def _placement_group_table() -> list[Any] | None:
    """Every placement group of the cluster as the GCS stores it; None (said once) where this
    Ray release lacks the internal accessor."""
    if _UNREADABLE:
        return None
    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        accessor = state._connect_and_get_accessor()
        rows = accessor.get_placement_group_table()
        return [gcs_pb2.PlacementGroupTableData.FromString(row) for row in rows]
    except (ImportError, AttributeError) as exc:
        _UNREADABLE.append(str(exc))
        log.warning(
            "cannot read Ray's placement-group table (%s): the placement groups of trials "
            "whose node dies while their workers start are not released until the study ends",
            exc,
        )
        return None


class PlacementGroupSweeper(Callback):
    """A Tune callback (in the study's driver) that runs `release_orphaned_placement_groups`
    every `every_s` seconds of the study, and says what it released."""

    def __init__(self, every_s: float = SWEEP_EVERY_S) -> None:
        self.every_s = every_s
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if 0 <= now - self._last < self.every_s:  # (a resumed study brings another clock)
            return
        self._last = now
        for group_id in release_orphaned_placement_groups():
            print(
                f"released placement group {group_id}: its trial's controller died (a lost "
                "node) before Ray Train could clean it up",
                file=sys.stdout,
                flush=True,
            )
