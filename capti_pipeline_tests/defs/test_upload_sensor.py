import os
from pathlib import Path

import dagster as dg

from capti_pipeline import cli
from capti_pipeline.defs.upload_sensor import delivery_upload_sensor
from capti_pipeline.lib.generator import DistrictSpec, generate_district, write_delivery
from capti_pipeline.resources import RosterStore
from capti_pipeline_tests.support.harness import CaptiEnv


def evaluate(env: CaptiEnv, cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(
        instance=env.instance,
        cursor=cursor,
        resources={"roster_store": RosterStore(database_url=env.database_url)},
    )
    return delivery_upload_sensor(context)


def test_a_settled_upload_starts_exactly_one_run(capti_env: CaptiEnv, tmp_path: Path):
    drop = tmp_path / "drop"
    drop.mkdir()
    capti_env.register("watched", drop)
    assert cli.main(["district", "set", "watched", "--watch-uploads", "on"]) == 0

    # Half an upload: users.csv arrived, manifest not yet.
    district = generate_district(DistrictSpec(district_id="watched", students=40))
    write_delivery(district, drop)
    (drop / "manifest.csv").rename(tmp_path / "manifest.csv")
    first = evaluate(capti_env, None)
    assert isinstance(first, dg.SensorResult) and first.run_requests == []
    second = evaluate(capti_env, first.cursor)
    assert second.run_requests == []

    (tmp_path / "manifest.csv").rename(drop / "manifest.csv")
    third = evaluate(capti_env, second.cursor)
    assert third.run_requests == []  # changed since the last look: let it settle
    fourth = evaluate(capti_env, third.cursor)
    [request] = fourth.run_requests
    assert request.partition_key == "watched" and request.tags["capti/trigger"] == "upload"
    assert evaluate(capti_env, fourth.cursor).run_requests == []  # same delivery: no second run

    # Tomorrow's delivery is a new listing and starts a new run once settled.
    users = drop / "users.csv"
    os.utime(users, (users.stat().st_atime, users.stat().st_mtime + 86400))
    fifth = evaluate(capti_env, fourth.cursor)
    assert fifth.run_requests == []
    [tomorrow] = evaluate(capti_env, fifth.cursor).run_requests
    assert tomorrow.run_key != request.run_key


def test_unwatched_districts_are_left_to_the_schedule(capti_env: CaptiEnv, tmp_path: Path):
    capti_env.register("plain", tmp_path)
    result = evaluate(capti_env, None)
    assert isinstance(result, dg.SkipReason)
