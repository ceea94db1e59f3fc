"""The full sync of a district with the roster store AND the Dagster instance on PostgreSQL."""

import uuid
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from capti_pipeline import service
from capti_pipeline.lib import store as st
from capti_pipeline.lib import sync
from capti_pipeline.lib.generator import (
    DistrictSpec,
    generate_district,
    remove_students,
    write_delivery,
)
from capti_pipeline_tests.support.state_check import assert_snapshot_matches_tables

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_server):
    suffix = uuid.uuid4().hex[:10]
    roster_url = postgres_server.create_database(f"roster_{suffix}")
    dagster_db = f"dagster_{suffix}"
    postgres_server.create_database(dagster_db)
    monkeypatch.setenv("CAPTI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAPTI_DATABASE_URL", roster_url)
    monkeypatch.setenv("CAPTI_STABILITY_WINDOW_MS", "0")
    overrides = {"storage": postgres_server.dagster_storage_config(dagster_db)}
    with dg.instance_for_test(overrides=overrides) as instance:
        yield instance, roster_url


def test_full_sync_on_postgres(pg_env, tmp_path: Path):
    instance, _roster_url = pg_env
    assert "postgres" in type(instance.run_storage).__name__.lower()
    district = generate_district(
        DistrictSpec(district_id="pg", students=400, students_per_school=200)
    )
    drop = tmp_path / "drop"
    write_delivery(district, drop)
    service.register_district("pg", str(drop), instance=instance)
    assert instance.has_dynamic_partition("districts", "pg")

    first = service.run_district_sync("pg", instance=instance)
    assert first.state == "applied", first.report
    engine = service.engine()
    assert engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        users = conn.execute(sa.select(sa.func.count()).select_from(st.users)).scalar_one()
    assert users == len(district.frames["users"])
    snapshot = sync.snapshot(engine, "pg")
    assert {u["sourcedId"] for u in snapshot["users"]} == set(district.frames["users"]["sourcedId"])

    # A nightly change, then the same delivery again.
    night2, leavers = remove_students(district, 0.02, seed=4)
    for path in drop.iterdir():
        path.unlink()
    write_delivery(night2, drop)
    second = service.run_district_sync("pg", instance=instance)
    assert second.state == "applied", second.report
    assert second.report["counts"]["users"]["archive"] == len(leavers)
    third = service.run_district_sync("pg", instance=instance)
    assert third.state == "no_changes"
    assert_snapshot_matches_tables(engine, "pg")

    # The run is in the PostgreSQL-backed Dagster instance, with its partition.
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": "pg"}))
    assert len(runs) == 3 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)

    after = {u["sourcedId"]: u for u in sync.snapshot(engine, "pg")["users"]}
    before = {u["sourcedId"]: u for u in snapshot["users"]}
    for sourced_id in leavers:
        assert after[sourced_id]["status"] == "archived"
        assert after[sourced_id]["accountId"] == before[sourced_id]["accountId"]
