"""Placement groups nobody will remove, which hold their CPUs while later trials wait for them.

Ray keeps a placement group until the job that made it ends. Two kinds outlive their use: those of a driver that
died (removed when a sweep starts and ends), and those of a Train controller lost with its node mid-sweep. The GCS
moves the lost controller's bundles onto a live node, where they hold the CPUs its retried trial needs until the
sweep ends; Train's own cleaner misses them when the node died while the worker group was starting (measured in
`tests/tuning/test_multinode.py` under load: the retry waited 10 minutes for the head's only CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Collection, Iterator

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.state import list_actors, list_jobs, list_placement_groups

from kd_tune.tuning.ray_compat import PlacementGroupTableData, placement_group_rows

log = logging.getLogger(__name__)
STATE_LIST_LIMIT = 10_000  # the State API lists 100 entries unless told otherwise, and 10,000 at most
ENDED_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
LOST_CHECK_S = 5.0  # how often a sweep looks for a lost controller's groups; a look costs 0.6 ms (50 groups)


def orphans(groups: list[dict], *, ended_jobs: set[str], own_job: str | None = None,
            occupied: Collection[str | None] = frozenset()) -> list[dict]:
    """The placement groups nobody will remove: CREATED, not detached, made by a job that has ended, or with
    own_job (a sweep whose trials are all over) by this driver's job and holding no live actor."""
    return [g for g in groups if g["state"] == "CREATED" and not g.get("is_detached") and (
        g["creator_job_id"] in ended_jobs
        or (g["creator_job_id"] == own_job and g["placement_group_id"] not in occupied))]


def lost(rows: list[PlacementGroupTableData], *, own_job: str) -> list[str]:
    """Ids of this job's live placement groups whose creating actor is dead (a Train controller lost with its
    node). The State API does not show a group's creator, so this reads the GCS table itself."""
    return [r.placement_group_id.hex() for r in rows
            if r.creator_job_id.hex() == own_job and r.creator_actor_dead
            and not ray.ActorID(r.creator_actor_id).is_nil()  # nil: made by a driver, whose death ends the job
            and not r.is_detached and r.state != PlacementGroupTableData.REMOVED]


def remove(find: Callable[[], list[str]], why: str) -> list[str]:
    """Remove the placement groups whose ids `find` returns, logging each with `why`; returns their ids. Never
    fails a sweep: a failed look (State API, GCS) is logged."""
    try:
        found = find()
        for group in found:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group)))
            log.warning("removed placement group %s: %s", group, why)
    except Exception as e:  # broad on purpose: cleaning up after others must never stop a sweep
        log.warning("could not look for placement groups %s: %s", why, e)
        return []
    return found


def find_orphans(*, own_job: bool) -> list[str]:
    """Ids of the `orphans`, from this cluster's State API."""
    # This cluster's State API, found through its GCS (RAY_API_SERVER_ADDRESS or RAY_ADDRESS first, as Ray does)
    where = {"address": ray.get_runtime_context().gcs_address, "limit": STATE_LIST_LIMIT}
    groups = [dataclasses.asdict(g) for g in list_placement_groups(filters=[("state", "=", "CREATED")],
                                                                   detail=True, **where)]
    ended = {j.job_id for j in list_jobs(**where) if j.job_id and j.status in ENDED_JOB_STATES}
    occupied = {a.placement_group_id for a in list_actors(filters=[("state", "!=", "DEAD")], detail=True,
                                                          **where)} if own_job else set()
    mine = ray.get_runtime_context().get_job_id() if own_job else None
    return [g["placement_group_id"] for g in orphans(groups, ended_jobs=ended, own_job=mine, occupied=occupied)]


def find_lost() -> list[str]:
    """Ids of this job's `lost` placement groups, from the GCS table."""
    return lost(placement_group_rows(), own_job=ray.get_runtime_context().get_job_id())


def remove_orphans(*, own_job: bool = False) -> list[str]:
    return remove(lambda: find_orphans(own_job=own_job), "left by an ended job, or by this sweep's finished trials")


def remove_lost() -> list[str]:
    return remove(find_lost, "its Train controller is dead (its node was lost)")


@contextlib.contextmanager
def removing_lost(every_s: float = LOST_CHECK_S) -> Iterator[None]:
    """Run `remove_lost` every `every_s` seconds on a background thread while the block runs."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every_s):
            remove_lost()

    thread = threading.Thread(target=loop, name="kd-tune-lost-placement-groups", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
