"""Operator commands end to end: pause / resume, adds-only mode and `capti-sync status`,
through the CLI and real Dagster runs of the district partition."""

import json
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from capti_pipeline.lib import operations
from capti_pipeline.lib import store as st
from capti_pipeline.lib.generator import (
    DistrictSpec,
    GeneratedDistrict,
    generate_district,
    remove_students,
    rename_users,
    write_delivery,
)
from capti_pipeline_tests.support.harness import EDFI, CaptiEnv

Cli = Callable[..., tuple[int, str]]
Status = Callable[..., Any]


def deliver(env: CaptiEnv, district: GeneratedDistrict, folder: str) -> Path:
    return write_delivery(district, env.delivery_dir(folder))


def users_by_id(env: CaptiEnv, district_id: str) -> dict[str, dict[str, Any]]:
    return {u["sourcedId"]: u for u in env.snapshot(district_id)["users"]}


# --- pause / resume ----------------------------------------------------------------------------


def test_pause_until_resume_and_automatic_resume(
    capti_env: CaptiEnv, run_cli: Cli, status_json: Status
) -> None:
    capti_env.register("edfi", EDFI)
    code, out = run_cli("pause", "edfi", "--until", "2099-06-30", "--reason", "summer")
    assert code == 0 and "paused until 2099-06-30" in out, out
    shown = status_json("edfi")
    assert (shown["paused"], shown["pause_reason"]) == (True, "summer")
    assert shown["paused_until"] == "2099-06-30T00:00:00-04:00"
    assert shown["next_scheduled_run"] == "2099-06-30T02:00:00-04:00"  # first night after it
    code, out = run_cli("status")
    assert "PAUSED until 2099-06-30T00:00:00-04:00 (summer)" in out
    assert "next scheduled run: 2099-06-30 02:00 EDT" in out

    code, out = run_cli("pause", "edfi", "--until", "2001-01-01")
    assert code == 1 and "not in the future" in out

    code, out = run_cli("resume", "edfi")
    assert code == 0, out
    shown = status_json("edfi")
    assert (shown["paused"], shown["paused_until"], shown["pause_reason"]) == (False, None, None)

    code, _ = run_cli("pause", "edfi")  # no --until: paused until resumed, no next run
    assert status_json("edfi")["next_scheduled_run"] is None
    # A pause whose --until has passed ends by itself (every reader resumes it first).
    with capti_env.engine().begin() as conn:
        operations.pause(
            conn, "edfi", date(2020, 1, 2), "old", now=datetime(2020, 1, 1, tzinfo=UTC)
        )
    assert status_json("edfi")["paused"] is False


def test_paused_district_cannot_be_imported_now_but_cli_run_still_works(
    capti_env: CaptiEnv, run_cli: Cli
) -> None:
    """Pause stops the automatic runs (schedule, Import Now); an operator's explicit
    `capti-sync run` is deliberate and still allowed."""
    capti_env.register("edfi", EDFI)
    run_cli("pause", "edfi")
    code, out = run_cli("import-now", "edfi")
    assert code == 1 and "refused" in out
    code, out = run_cli("run", "edfi")
    assert code == 0 and "applied" in out, out


# --- adds-only --------------------------------------------------------------------------------


def test_adds_only_creates_but_never_archives_or_updates(
    capti_env: CaptiEnv, run_cli: Cli, status_json: Status
) -> None:
    env = capti_env
    full = generate_district(DistrictSpec(district_id="ao", students=200, seed=11))
    night1, removed_first = remove_students(full, 0.04, seed=1)
    night2, removed_second = remove_students(full, 0.04, seed=2)
    night2, renamed = rename_users(night2, 0.05, seed=3)
    created = set(removed_first) - set(removed_second)  # back in night 2: new to the store
    archived = set(removed_second) - set(removed_first)  # gone in night 2
    renamed_kept = set(renamed) - set(removed_second)
    assert created and archived and renamed_kept

    source = deliver(env, night1, "ao")
    env.register("ao", source)
    assert env.run("ao").state == "applied"
    before = users_by_id(env, "ao")

    code, out = run_cli("district", "set", "ao", "--adds-only", "on")
    assert code == 0, out
    deliver(env, night2, "ao")
    outcome = env.run("ao")
    assert outcome.state == "applied", outcome.report
    counts = outcome.report["counts"]
    assert counts["users"] == {"create": len(created), "update": 0, "archive": 0, "restore": 0}
    assert all(per.get("archive", 0) == 0 and per.get("update", 0) == 0 for per in counts.values())
    assert outcome.report["skipped_by_adds_only"]["users"] == len(archived) + len(renamed_kept)

    after = users_by_id(env, "ao")
    assert set(after) == set(before) | created
    for sourced_id in archived:  # missing from the delivery, but kept active
        assert after[sourced_id]["status"] == "active"
    for sourced_id in renamed_kept:  # renamed in the delivery, but not updated
        assert after[sourced_id]["familyName"] == before[sourced_id]["familyName"]
    for sourced_id in created:
        assert after[sourced_id]["status"] == "active"
    assert status_json("ao")["adds_only"] is True

    # Switching it off applies what adds-only held back.
    run_cli("district", "set", "ao", "--adds-only", "off")
    outcome = env.run("ao")
    assert outcome.state == "applied", outcome.report
    final = users_by_id(env, "ao")
    assert {s for s, u in final.items() if u["status"] != "active"} == archived
    renamed_names = night2.frames["users"].set_index("sourcedId")["familyName"]
    for sourced_id in renamed_kept:
        assert final[sourced_id]["familyName"] == renamed_names[sourced_id]


# --- status -------------------------------------------------------------------------------------


def test_status_lists_every_district_with_state_counts_and_flags(
    capti_env: CaptiEnv, run_cli: Cli, status_json: Status
) -> None:
    env = capti_env
    env.register("edfi", EDFI)
    big = generate_district(DistrictSpec(district_id="big", students=150, seed=5))
    env.register("big", deliver(env, big, "big"))
    env.register("quiet", EDFI)
    assert env.run("edfi").state == "applied"
    assert env.run("big").state == "applied"
    shrunk, _ = remove_students(big, 0.3, seed=4)  # 30 % of students gone: over the 10 % rule
    deliver(env, shrunk, "big")
    assert env.run("big").state == "held"
    run_cli("pause", "quiet", "--reason", "onboarding")

    rows = {row["district"]: row for row in status_json()}
    assert list(rows) == ["big", "edfi", "quiet"]
    edfi, held, quiet = rows["edfi"], rows["big"], rows["quiet"]
    assert (edfi["state"], edfi["last_result"], edfi["held"], edfi["paused"]) == (
        "applied",
        "applied",
        False,
        False,
    )
    assert edfi["counts"]["users"]["create"] == 10
    assert edfi["last_finished_at"].endswith(("-04:00", "-05:00"))
    assert datetime.fromisoformat(edfi["next_scheduled_run"]).hour == 2
    assert (held["state"], held["held"]) == ("held", True)
    assert held["counts"]["users"]["archive"] > 0  # what the held plan would do
    assert (quiet["state"], quiet["paused"], quiet["last_run_id"]) == ("registered", True, None)
    assert quiet["next_scheduled_run"] is None

    code, out = run_cli("status")
    assert code == 0
    assert "big: held [HELD]" in out
    assert "quiet: registered [PAUSED (onboarding)]" in out
    assert "next scheduled run: none (paused)" in out
    assert json.loads(run_cli("status", "edfi", "--json")[1])["district"] == "edfi"


@pytest.mark.parametrize("state", ["failed", "held"])
def test_status_running_flag_follows_the_store(
    capti_env: CaptiEnv, status_json: Status, state: str
) -> None:
    capti_env.register("edfi", EDFI)
    with capti_env.engine().begin() as conn:  # a run of another Dagster instance, say
        st.record_run_start(conn, "r1", "edfi", kind="sync", trigger="ui")
    assert status_json("edfi")["running"] is True  # left alone: this instance cannot judge it
    with capti_env.engine().begin() as conn:
        st.record_run_end(conn, "r1", state=state, reason="x")
    shown = status_json("edfi")
    assert (shown["running"], shown["held"], shown["state"]) == (False, state == "held", state)
