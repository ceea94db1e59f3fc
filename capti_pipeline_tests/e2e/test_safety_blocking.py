"""The blocking `within_safety_limits` check in the instance's event log, and the completeness
rule end to end: a held run never reaches the apply step, a required file missing compared with
the last applied delivery changes nothing."""

import dagster as dg

from capti_pipeline.lib import store as st
from capti_pipeline.lib.generator import DistrictSpec, generate_district
from capti_pipeline_tests.fixtures.deliveries import baseline
from capti_pipeline_tests.support.harness import CaptiEnv
from capti_pipeline_tests.support.operator import deliver, keep_users


def _step_events(env: CaptiEnv, run_id: str, event_type: dg.DagsterEventType) -> set[str]:
    return {e.step_key for e in env.instance.all_logs(run_id, of_type=event_type) if e.step_key}


def assert_nothing_applied(env: CaptiEnv, run_id: str) -> None:
    """The blocking check stopped the run before the apply: no step, no materialization."""
    started = _step_events(env, run_id, dg.DagsterEventType.STEP_START)
    assert "applied_roster_changes" not in started and "sync_report" not in started
    materialized = {
        e.asset_materialization.asset_key.to_user_string()
        for e in env.instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        if e.asset_materialization
    }
    assert "applied_roster_changes" not in materialized and "sync_report" not in materialized


def test_held_run_never_reaches_the_apply_step(capti_env: CaptiEnv) -> None:
    env = capti_env
    spec = DistrictSpec(district_id="hp", students=240, students_per_school=80, seed=3)
    folder = deliver(env, generate_district(spec), "hp")
    env.register("hp", folder)
    assert env.run("hp").state == "applied"
    keep_users(folder, 0.10)
    held = env.run("hp")
    assert held.state == "held"
    assert_nothing_applied(env, held.run_id)
    assert "roster_diff" in _step_events(env, held.run_id, dg.DagsterEventType.STEP_START)
    [check] = [
        e.dagster_event.event_specific_data
        for e in env.instance.all_logs(
            held.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        )
        if e.dagster_event
        and e.dagster_event.event_specific_data.check_name == "within_safety_limits"
    ]
    assert check.passed is False and check.blocking is True
    latest = env.instance.get_latest_materialization_event(dg.AssetKey("applied_roster_changes"))
    assert latest is not None and latest.run_id != held.run_id  # still the first import's


def _imported_small(env: CaptiEnv, district_id: str) -> dict:
    drop = env.delivery_dir(district_id)
    baseline().write(drop)
    env.register(district_id, drop)
    with env.engine().begin() as conn:  # 8 users: one archive is over the default 10 %
        st.upsert_district(
            conn,
            district_id,
            thresholds={"*": {"archive": {"percent": 100}, "update": {"percent": 100}}},
        )
    assert env.run(district_id).state == "applied"
    return env.snapshot(district_id)


def test_a_file_declared_absent_in_a_bulk_package_is_held(capti_env: CaptiEnv) -> None:
    before = _imported_small(capti_env, "absent")
    nightly = baseline().remove_file("enrollments.csv")
    nightly.manifest["file.enrollments"] = "absent"
    nightly.write(capti_env.delivery_dir("absent"))
    outcome = capti_env.run("absent")
    assert (outcome.state, outcome.exit_code) == ("held", 3), outcome.report
    [hold] = outcome.report["holds"]
    assert (hold["rule"], hold["entity"], hold["action"]) == (
        "completeness",
        "enrollments.csv",
        "missing",
    )
    assert "the last applied delivery had it (9 rows)" in hold["message"]
    assert capti_env.snapshot("absent") == before
    assert_nothing_applied(capti_env, outcome.run_id)


def test_a_required_file_missing_against_the_manifest_is_refused(capti_env: CaptiEnv) -> None:
    """The manifest says enrollments.csv is a bulk file but it did not arrive: a broken
    delivery, refused by validation before any plan (stricter than a hold); nothing applied."""
    before = _imported_small(capti_env, "gone")
    nightly = baseline().remove_file("enrollments.csv")
    nightly.write(capti_env.delivery_dir("gone"))
    outcome = capti_env.run("gone")
    assert (outcome.state, outcome.exit_code) == ("refused", 2), outcome.report
    assert "enrollments.csv" in outcome.report["reason"]
    assert capti_env.snapshot("gone") == before
    assert_nothing_applied(capti_env, outcome.run_id)
