"""Placement groups nobody will remove: an ended job's, this finished sweep's, a lost Train controller's."""

import shutil
import tempfile
import time

import pytest

from kd_tune.tuning.placement import orphans, remove_lost, removing_lost


def test_orphans_are_created_groups_of_ended_jobs_or_of_this_finished_sweep():
    # Rule: only CREATED, non-detached groups are removed: those of ended jobs, and with own_job those of this
    # driver's job that hold no live actor; a live job's, a pending or a detached group is never touched.
    def group(pg_id, job, state="CREATED", detached=False):
        return {"placement_group_id": pg_id, "creator_job_id": job, "state": state, "is_detached": detached}

    groups = [group("dead", "01"), group("live", "02"), group("pending", "01", state="PENDING"),
              group("detached", "01", detached=True), group("mine_idle", "03"), group("mine_busy", "03")]
    start = orphans(groups, ended_jobs={"01"})
    end = orphans(groups, ended_jobs={"01"}, own_job="03", occupied={"mine_busy"})
    assert [g["placement_group_id"] for g in start] == ["dead"]
    assert [g["placement_group_id"] for g in end] == ["dead", "mine_idle"]


@pytest.mark.slow
def test_a_dead_actors_group_is_removed_while_the_job_runs_and_a_drivers_never(monkeypatch):
    # Rule: a group whose creating actor died (a Train controller lost with its node) holds its CPUs until the job
    # ends; remove_lost removes it while the job runs, removing_lost does so in the background within a bound, and
    # a group of a live actor or of the driver itself is never touched.
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="kdp", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp_dir)  # one CPU per group
    try:
        @ray.remote(num_cpus=0)
        class Controller:
            def make(self) -> str:
                group = placement_group([{"CPU": 1}])
                ray.get(group.ready(), timeout=60)
                return group.id.hex()

        drivers = placement_group([{"CPU": 1}])
        ray.get(drivers.ready(), timeout=60)
        first, second, alive = Controller.remote(), Controller.remote(), Controller.remote()
        groups = [ray.get(c.make.remote()) for c in (first, second, alive)]
        assert remove_lost() == []  # every creator alive
        ray.kill(first)
        deadline = time.monotonic() + 30
        while not (removed := remove_lost()) and time.monotonic() < deadline:  # the GCS learns of the death
            time.sleep(0.2)
        assert removed == [groups[0]]
        with removing_lost(every_s=0.2):
            ray.kill(second)
            deadline = time.monotonic() + 30
            while placement_group_table()[groups[1]]["state"] != "REMOVED" and time.monotonic() < deadline:
                time.sleep(0.2)
        states = {pg: placement_group_table()[pg]["state"] for pg in [*groups, drivers.id.hex()]}
        assert states == {groups[0]: "REMOVED", groups[1]: "REMOVED", groups[2]: "CREATED",
                          drivers.id.hex(): "CREATED"}
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
