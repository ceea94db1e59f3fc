"""The code location loads, with the names operators rely on, and without deprecated APIs."""

import importlib
import pkgutil
import sys
import warnings

import dagster as dg

import capti_pipeline.defs
from capti_pipeline.definitions import defs


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("roster_sync_job")
    assert job.partitions_def is not None and job.partitions_def.name == "districts"
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == {
        "oneroster_delivery",
        "validated_oneroster_frames",
        "resolved_roster",
        "roster_diff",
        "applied_roster_changes",
        "sync_report",
    }
    # Lineage is a chain: raw delivery → frames → roster → diff → applied → report.
    parents = {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert parents["validated_oneroster_frames"] == {"oneroster_delivery"}
    assert parents["resolved_roster"] == {"validated_oneroster_frames"}
    assert parents["roster_diff"] == {"resolved_roster"}
    assert parents["applied_roster_changes"] == {"roster_diff"}
    assert parents["sync_report"] == {"roster_diff", "applied_roster_changes"}


def test_schedule_and_sensors():
    schedule = defs.resolve_schedule_def("nightly_roster_sync")
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.execution_timezone == "America/New_York"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    for name in ("district_discovery_sensor", "import_now_sensor", "sync_run_failure_sensor"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING


def test_blocking_checks():
    graph = defs.resolve_asset_graph()
    checks = {key.name: graph.get_check_spec(key) for key in graph.asset_check_keys}
    assert checks["delivery_accepted"].blocking
    assert checks["within_safety_limits"].blocking
    assert not checks["rows_valid"].blocking


def test_defs_modules_use_no_deprecated_dagster_api():
    modules = [
        m.name for m in pkgutil.walk_packages(capti_pipeline.defs.__path__, "capti_pipeline.defs.")
    ]
    assert modules
    for name in modules:
        sys.modules.pop(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in modules:
            importlib.import_module(name)


def test_registering_a_district_creates_the_apply_pool_limit(capti_env, tmp_path):
    # Created once, up front: Dagster would create it on the first claim, and two runs doing
    # that at the same time on PostgreSQL can fail one of them.
    from capti_pipeline import service

    overrides = {"concurrency": {"pools": {"default_limit": 2}}}  # as the project's dagster.yaml
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home"), overrides=overrides) as instance:
        storage = instance.event_log_storage
        assert "roster_db" not in storage.get_concurrency_keys()
        service.register_district(
            "pool-check", str(capti_env.delivery_dir("pool-check")), instance=instance
        )
        assert "roster_db" in storage.get_concurrency_keys()
        assert storage.get_concurrency_info("roster_db").slot_count == 2
