"""District discovery, Import Now and the run-failure sensor against a real Dagster instance:
sensors are evaluated with build_*_context, and the runs they ask for are really executed."""

from collections.abc import Callable
from datetime import datetime
from typing import Any

import dagster as dg
import pytest

from capti_pipeline.definitions import defs
from capti_pipeline.defs.sensors import (
    IMPORT_REQUEST_TAG,
    district_discovery_sensor,
    import_now_sensor,
    sync_run_failure_sensor,
)
from capti_pipeline.lib import operations, sync
from capti_pipeline.lib import store as st
from capti_pipeline_tests.defs.conftest import (
    apply_partition_requests,
    run_requests,
    sensor_resources,
)
from capti_pipeline_tests.support.harness import EDFI, CaptiEnv

Cli = Callable[..., tuple[int, str]]
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def discover(env: CaptiEnv) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(instance=env.instance, resources=sensor_resources(env))
    result = district_discovery_sensor(context)
    apply_partition_requests(env.instance, result)
    return result


def import_now(env: CaptiEnv) -> list[dg.RunRequest]:
    context = dg.build_sensor_context(instance=env.instance, resources=sensor_resources(env))
    result = import_now_sensor(context)
    apply_partition_requests(env.instance, result)
    return run_requests(result)


def execute(env: CaptiEnv, request: dg.RunRequest, **kwargs: Any) -> dg.ExecuteInProcessResult:
    """Launch a sensor's RunRequest against the instance, as the daemon would."""
    return defs.resolve_job_def("roster_sync_job").execute_in_process(
        instance=env.instance,
        partition_key=request.partition_key,
        tags=request.tags,
        run_config=QUIET,
        **kwargs,
    )


def fail_with_sensor(env: CaptiEnv, run_id: str) -> None:
    """Evaluate sync_run_failure_sensor for a failed run, as the daemon does."""
    run = env.instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
    [failure] = env.instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    context = dg.build_run_status_sensor_context(
        sensor_name="sync_run_failure_sensor",
        dagster_event=failure.dagster_event,  # type: ignore[arg-type]
        dagster_instance=env.instance,
        dagster_run=run,
        resources=sensor_resources(env),
    ).for_run_failure()
    sync_run_failure_sensor(context)


def request_row(env: CaptiEnv, request_id: int) -> operations.ImportRequest:
    with env.engine().connect() as conn:
        return operations.get_request(conn, request_id)


def request_status(env: CaptiEnv, request_id: int) -> str:
    with env.engine().connect() as conn:
        return operations.request_status(conn, operations.get_request(conn, request_id))


# --- district_discovery_sensor ---------------------------------------------------------------


def test_discovery_adds_registered_and_deletes_removed_partitions(capti_env: CaptiEnv) -> None:
    env = capti_env
    env.instance.add_dynamic_partitions("districts", ["stale"])  # no longer in the registry
    with env.engine().begin() as conn:  # registered straight in the store: no partition yet
        for district_id in ("d1", "d2"):
            st.upsert_district(conn, district_id, source_url=str(EDFI))

    result = discover(env)
    assert isinstance(result, dg.SensorResult)
    assert sorted(env.instance.get_dynamic_partitions("districts")) == ["d1", "d2"]

    with env.engine().begin() as conn:  # what `capti-sync district remove` does in the store
        st.upsert_district(conn, "d2", active=False)
    discover(env)
    assert env.instance.get_dynamic_partitions("districts") == ["d1"]

    assert isinstance(discover(env), dg.SkipReason)  # nothing to do the third time


def test_discovery_creates_the_apply_pool_limit(capti_env: CaptiEnv, tmp_path) -> None:
    # A district registered straight in the store is first run by the daemon, not by the CLI:
    # the sensor that gives it a partition also creates the pool limit its runs would race for.
    with capti_env.engine().begin() as conn:
        st.upsert_district(conn, "d1", source_url=str(EDFI))
    overrides = {"concurrency": {"pools": {"default_limit": 2}}}  # as the project's dagster.yaml
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=overrides) as instance:
        storage = instance.event_log_storage
        assert "roster_db" not in storage.get_concurrency_keys()
        context = dg.build_sensor_context(instance=instance, resources=sensor_resources(capti_env))
        assert isinstance(district_discovery_sensor(context), dg.SensorResult)
        assert storage.get_concurrency_info("roster_db").slot_count == 2


def test_rerunning_one_district_partition(capti_env: CaptiEnv) -> None:
    env = capti_env
    env.register("a", EDFI)
    env.register("b", EDFI)
    assert env.run("a").state == "applied"
    again = env.run("a")  # re-run of the same partition: clean, nothing to change
    assert again.state == "no_changes"
    materialized = env.instance.get_materialized_partitions(dg.AssetKey("sync_report"))
    assert materialized == {"a"}
    with env.engine().connect() as conn:
        assert st.latest_run(conn, "b") is None
    assert env.snapshot("b")["users"] == []


# --- import_now_sensor -----------------------------------------------------------------------


def test_import_now_end_to_end(
    capti_env: CaptiEnv, run_cli: Cli, status_json: Callable[..., Any]
) -> None:
    env = capti_env
    env.register("edfi", EDFI)
    code, out = run_cli("import-now", "edfi", "--by", "alice")
    assert code == 0 and "import-now #1 queued" in out, out

    [shown] = status_json("edfi")["import_requests"]
    assert (shown["id"], shown["requested_by"], shown["status"]) == (1, "alice", "queued")
    assert shown["requested_at"].endswith(("-05:00", "-04:00"))  # shown in Eastern time

    [request] = import_now(env)
    assert request.partition_key == "edfi"
    assert request.run_key == "import-now:1"
    assert request.tags[IMPORT_REQUEST_TAG] == "1"
    assert request.tags["capti/trigger"] == "import_now:alice"
    assert request_row(env, 1).state == "taken"
    assert import_now(env) == []  # evaluated again: no second run for the same request

    result = execute(env, request)
    assert result.success
    assert import_now(env) == []  # still nothing new after the run
    row = request_row(env, 1)
    assert row.dagster_run_id == result.run_id
    assert request_status(env, 1) == "applied"
    [shown] = status_json("edfi")["import_requests"]
    assert (shown["status"], shown["run_id"]) == ("applied", result.run_id)
    assert len(env.snapshot("edfi")["users"]) == 10


def test_import_request_status_goes_queued_running_applied(
    capti_env: CaptiEnv, run_cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a later sensor tick: the run's first asset links the request, so the admin page
    shows running while the run works, then its outcome."""
    env = capti_env
    env.register("edfi", EDFI)
    run_cli("import-now", "edfi", "--by", "alice")
    [request] = import_now(env)
    assert request_status(env, 1) == "queued"  # taken, but its run has not started

    seen_during_run: list[str] = []
    validate = sync.validate_landed_delivery

    def spy(*args: Any, **kwargs: Any) -> Any:  # called by the second asset of the run
        seen_during_run.append(request_status(env, 1))
        return validate(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(sync, "validate_landed_delivery", spy)
        result = execute(env, request)
    assert seen_during_run == ["running"]
    assert request_row(env, 1).dagster_run_id == result.run_id
    assert request_status(env, 1) == "applied"


def test_import_now_for_a_paused_district_is_refused(
    capti_env: CaptiEnv, run_cli: Cli, status_json: Callable[..., Any]
) -> None:
    env = capti_env
    env.register("edfi", EDFI)
    code, out = run_cli("pause", "edfi", "--reason", "contract renewal")
    assert code == 0, out
    code, out = run_cli("import-now", "edfi", "--by", "bob")
    assert code == 1
    assert "refused: district is paused: contract renewal" in out
    [shown] = status_json("edfi")["import_requests"]
    assert (shown["status"], shown["detail"]) == ("refused", "district is paused: contract renewal")
    assert import_now(env) == []


def test_import_now_pending_when_district_gets_paused_is_refused_by_the_sensor(
    capti_env: CaptiEnv, run_cli: Cli
) -> None:
    env = capti_env
    env.register("edfi", EDFI)
    env.register("other", EDFI)
    run_cli("import-now", "edfi", "--by", "carol")
    run_cli("import-now", "other", "--by", "carol")
    run_cli("pause", "edfi", "--until", "2099-01-01")
    [request] = import_now(env)
    assert request.partition_key == "other"
    assert request_status(env, 1) == "refused"
    assert "district is paused until 2099-01-01 00:00 EST" in (request_row(env, 1).detail or "")


def test_import_now_for_a_district_without_partition_adds_it(
    capti_env: CaptiEnv, run_cli: Cli
) -> None:
    env = capti_env
    with env.engine().begin() as conn:
        st.upsert_district(conn, "fresh", source_url=str(EDFI))
    run_cli("import-now", "fresh")
    [request] = import_now(env)
    assert env.instance.get_dynamic_partitions("districts") == ["fresh"]
    assert execute(env, request).success
    assert import_now(env) == []  # the next tick links the request to its run
    assert request_status(env, 1) == "applied"


def test_import_now_failed_run_shows_failed(capti_env: CaptiEnv, run_cli: Cli) -> None:
    env = capti_env
    source = env.delivery_dir("gone")
    for csv in EDFI.iterdir():
        (source / csv.name).write_bytes(csv.read_bytes())
    env.register("gone", source)
    for csv in source.iterdir():  # the district's folder disappears after registration
        csv.unlink()
    source.rmdir()
    run_cli("import-now", "gone")
    [request] = import_now(env)
    result = execute(env, request, raise_on_error=False)
    assert not result.success
    fail_with_sensor(env, result.run_id)
    import_now(env)
    assert request_status(env, 1) == "failed"
    with env.engine().connect() as conn:
        assert st.get_district(conn, "gone").state == "failed"


def test_import_run_canceled_before_it_started_shows_failed(
    capti_env: CaptiEnv, run_cli: Cli
) -> None:
    """A queued run canceled in the UI never executes an asset: the sensor links and records it."""
    env = capti_env
    env.register("edfi", EDFI)
    run_cli("import-now", "edfi")
    [request] = import_now(env)
    job = defs.resolve_job_def("roster_sync_job")
    run = env.instance.create_run_for_job(
        job_def=job, tags={**request.tags, "dagster/partition": "edfi"}
    )
    env.instance.report_run_canceled(run)
    assert request_status(env, 1) == "queued"
    assert import_now(env) == []
    assert request_row(env, 1).dagster_run_id == run.run_id
    assert request_status(env, 1) == "failed"


def test_import_request_lost_before_its_run_was_created_is_asked_again(
    capti_env: CaptiEnv, run_cli: Cli
) -> None:
    """The daemon died after the sensor marked the request taken but before it created the run."""
    env = capti_env
    env.register("edfi", EDFI)
    run_cli("import-now", "edfi")
    [request] = import_now(env)  # ...and this RunRequest is never submitted
    assert import_now(env) == []  # a recently taken request is waited for
    with env.engine().begin() as conn:
        conn.execute(
            st.import_requests.update().values(taken_at=datetime(2020, 1, 1))  # long ago
        )
    [again] = import_now(env)
    assert (again.run_key, again.tags) == (request.run_key, request.tags)  # Dagster dedupes it


# --- sync_run_failure_sensor -------------------------------------------------------------------


def test_failure_sensor_records_a_run_that_died_while_running(
    capti_env: CaptiEnv, monkeypatch: pytest.MonkeyPatch, status_json: Callable[..., Any]
) -> None:
    env = capti_env
    env.register("edfi", EDFI)

    def crash(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("worker lost")  # dies outside the assets' own error handling

    with monkeypatch.context() as patched:  # not monkeypatch.undo(): capti_env's env vars stay
        patched.setattr(sync, "plan_sync", crash)
        result = defs.resolve_job_def("roster_sync_job").execute_in_process(
            instance=env.instance, partition_key="edfi", raise_on_error=False, run_config=QUIET
        )
    assert not result.success
    with env.engine().connect() as conn:
        assert st.get_run(conn, result.run_id).state == "running"  # type: ignore[union-attr]

    fail_with_sensor(env, result.run_id)
    with env.engine().connect() as conn:
        run = st.get_run(conn, result.run_id)
        assert run is not None and run.state == "failed"
        assert "worker lost" in (run.reason or "")
        assert st.get_district(conn, "edfi").state == "failed"
    [row] = status_json()
    assert (row["state"], row["last_result"], row["running"]) == ("failed", "failed", False)

    fail_with_sensor(env, result.run_id)  # evaluated again: the outcome is kept, not rewritten
    with env.engine().connect() as conn:
        assert st.get_run(conn, result.run_id).reason == run.reason  # type: ignore[union-attr]


def test_status_reconciles_a_canceled_run(
    capti_env: CaptiEnv, status_json: Callable[..., Any]
) -> None:
    """No daemon (so no failure sensor): `status` itself notices the Dagster run is over."""
    env = capti_env
    env.register("edfi", EDFI)
    run = env.instance.create_run_for_job(
        job_def=defs.resolve_job_def("roster_sync_job"), tags={"dagster/partition": "edfi"}
    )
    with env.engine().begin() as conn:
        st.record_run_start(conn, run.run_id, "edfi", kind="sync", trigger="ui")
    assert status_json("edfi")["state"] == "running"
    env.instance.report_run_canceled(run)
    shown = status_json("edfi")
    assert (shown["state"], shown["last_result"]) == ("failed", "failed")
    assert "canceled" in shown["detail"]
