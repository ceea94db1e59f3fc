"""One run per district at a time: the instance's run queue limit (dagster.yaml) and the store's
per-district version claim, exercised with real concurrent `capti-sync run` processes."""

import os
import signal
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from capti_pipeline.lib import store as st
from capti_pipeline.lib import sync
from capti_pipeline.lib.generator import DistrictSpec, generate_district, write_delivery
from capti_pipeline.resources import store_engine
from capti_pipeline_tests.defs.conftest import PROJECT_ROOT, ProjectHome, make_project_home
from capti_pipeline_tests.support.harness import CaptiEnv, snapshot_without_ids

STUDENTS = 3000  # big enough that two runs overlap (several seconds each)


@pytest.fixture(scope="module")
def big_delivery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    district = generate_district(DistrictSpec(district_id="big", students=STUDENTS, seed=3))
    return write_delivery(district, tmp_path_factory.mktemp("big") / "delivery")


def test_project_dagster_yaml_loads_with_one_run_per_district(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_bytes((PROJECT_ROOT / "dagster.yaml").read_bytes())
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        config = instance.get_concurrency_config()
        queue = config.run_queue_config
        assert queue is not None
        assert {
            "key": "dagster/partition",
            "value": {"applyLimitPerUniqueValue": True},
            "limit": 1,
        } in queue.tag_concurrency_limits
        assert queue.max_concurrent_runs >= 2  # several districts may sync at the same time
        assert config.pool_config.default_pool_limit is not None
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_runtime_seconds > 0  # a hung run ends, eventually


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def concurrent_home(request: pytest.FixtureRequest, tmp_path: Path) -> ProjectHome:
    """A deployed-like home on the SQLite default, or with the roster store AND the Dagster
    instance on the throwaway PostgreSQL cluster."""
    home = make_project_home(tmp_path / "deployed")
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        suffix = uuid.uuid4().hex[:10]
        home.env["CAPTI_DATABASE_URL"] = server.create_database(f"roster_{suffix}")
        server.create_database(f"dagster_{suffix}")
        config_path = home.dagster_home / "dagster.yaml"
        config = yaml.safe_load(config_path.read_text())
        config["storage"] = server.dagster_storage_config(f"dagster_{suffix}")
        config_path.write_text(yaml.safe_dump(config))
    return home


def _snapshot(home: ProjectHome) -> dict:
    return sync.snapshot(store_engine(home.database_url), "big")


@pytest.mark.slow
def test_two_concurrent_cli_runs_of_one_district(
    concurrent_home: ProjectHome, big_delivery: Path, capti_env: CaptiEnv
) -> None:
    home = concurrent_home
    assert home.cli("district", "add", "big", "--source", str(big_delivery)).returncode == 0
    first, second = home.popen_cli("run", "big"), home.popen_cli("run", "big")
    outputs = []
    for process in (first, second):
        out, _ = process.communicate(timeout=300)
        outputs.append((process.returncode, out))

    applied = [o for o in outputs if o[0] == 0 and ": applied." in o[1]]
    others = [o for o in outputs if o not in applied]
    assert len(applied) == 1, outputs
    [(code, out)] = others
    assert (
        (code == 0 and ": no_changes" in out)
        or (code == 1 and "already has a run in progress" in out)
        or (code == 1 and "the roster changed" in out and "nothing applied" in out)
    ), out

    engine = store_engine(home.database_url)
    with engine.connect() as conn:
        runs = conn.execute(sa.select(st.sync_runs.c.state)).scalars().all()
        version = st.get_district(conn, "big").roster_version
    assert runs.count("applied") == 1 and "running" not in runs, runs
    assert version == 1  # exactly one apply took the district's version claim
    # The reference: the same delivery synced once, alone, in a separate store.
    capti_env.register("big", big_delivery)
    assert capti_env.run("big").state == "applied"
    assert snapshot_without_ids(_snapshot(home)) == snapshot_without_ids(capti_env.snapshot("big"))

    # Both were real Dagster runs of the same partition and they did overlap in time.
    with dg.DagsterInstance.from_config(str(home.dagster_home)) as instance:
        records = instance.get_run_records(dg.RunsFilter(tags={"dagster/partition": "big"}))
    if len(records) == 2:
        (a_start, a_end), (b_start, b_end) = [(r.start_time, r.end_time) for r in records]
        assert a_start < b_end and b_start < a_end, "the two runs did not overlap"


@pytest.mark.slow
def test_killed_cli_run_is_failed_and_does_not_lock_the_district(
    project_home: ProjectHome, big_delivery: Path
) -> None:
    home = project_home
    assert home.cli("district", "add", "big", "--source", str(big_delivery)).returncode == 0
    process = home.popen_cli("run", "big")
    engine = store_engine(home.database_url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the run is inside the sync
        with engine.connect() as conn:
            run = st.latest_run(conn, "big")
        if run is not None:
            break
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.1)
    else:
        pytest.fail("the run never started")
    os.kill(process.pid, signal.SIGKILL)  # no handler runs: Dagster's run stays STARTED
    process.communicate(timeout=30)

    shown = home.status("big")
    assert shown["state"] == "failed" and shown["running"] is False, shown
    assert "is gone" in shown["detail"]
    done = home.cli("run", "big")  # not refused as "run in progress"
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": applied." in done.stdout or ": no_changes" in done.stdout
    with dg.DagsterInstance.from_config(str(home.dagster_home)) as instance:
        killed = instance.get_run_by_id(run.run_id)
    assert killed is not None and killed.status == dg.DagsterRunStatus.FAILURE
