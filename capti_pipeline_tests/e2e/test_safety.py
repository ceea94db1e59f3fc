"""Never wipe a district by mistake: holds, approve/discard, scoped deletions, undo, duplicates."""

import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from capti_pipeline import cli
from capti_pipeline.lib.generator import (
    DistrictSpec,
    GeneratedDistrict,
    generate_district,
    remove_students,
    rename_users,
    write_delivery,
)
from capti_pipeline_tests.support import operator
from capti_pipeline_tests.support.harness import CaptiEnv
from capti_pipeline_tests.support.operator import keep_users
from capti_pipeline_tests.support.state_check import assert_snapshot_matches_tables

SPEC = DistrictSpec(district_id="safe", students=240, students_per_school=80, seed=3)


def deliver(env: CaptiEnv, district: GeneratedDistrict) -> Path:
    return operator.deliver(env, district, "safe")


def cli_out(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture
def imported(capti_env: CaptiEnv) -> tuple[CaptiEnv, GeneratedDistrict, dict]:
    district = generate_district(SPEC)
    capti_env.register("safe", deliver(capti_env, district))
    first = capti_env.run("safe")  # a first import of an empty district is never held
    assert first.state == "applied", first.report
    return capti_env, district, capti_env.snapshot("safe")


def test_users_cut_to_a_tenth_is_held_then_approved(imported, capsys):
    env, district, before = imported
    folder = env.root / "drop" / "safe"
    cut = keep_users(folder, 0.10)
    outcome = env.run("safe")
    assert outcome.state == "held" and outcome.exit_code == 3
    assert env.snapshot("safe") == before  # nothing applied
    holds = outcome.report["holds"]
    assert any(h["entity"] == "users" and h["action"] == "archive" for h in holds)
    assert any(h["rule"] == "completeness" and h["entity"] == "users.csv" for h in holds)
    assert "exceeds the 10% limit" in outcome.report["reason"]

    code, out = cli_out(capsys, "status", "safe", "--json")
    status = json.loads(out)
    assert status["state"] == "held" and status["held"] is True
    assert "users archive" in status["detail"]
    code, out = cli_out(capsys, "report", "safe")
    archived_ids = outcome.report["affected"]["users"]["archive"]
    assert archived_ids[0] in out and "Held by safety rules" in out

    # Approve applies exactly the held plan, even though the folder has changed since.
    write_delivery(district, folder)
    code, out = cli_out(capsys, "approve", "safe", "--by", "support@capti")
    assert code == 0, out
    after = {u["sourcedId"]: u for u in env.snapshot("safe")["users"]}
    archived = [s for s, u in after.items() if u["status"] == "archived"]
    assert sorted(archived) == sorted(cut)
    assert_snapshot_matches_tables(env.engine(), "safe")  # the approve recorded its state too
    code, out = cli_out(capsys, "status", "safe", "--json")
    assert json.loads(out)["state"] == "applied"


def test_discard_leaves_the_roster_as_it_was(imported, capsys):
    env, _, before = imported
    keep_users(env.root / "drop" / "safe", 0.10)
    assert env.run("safe").exit_code == 3
    code, out = cli_out(capsys, "discard", "safe")
    assert code == 0 and "unchanged" in out
    assert env.snapshot("safe") == before
    code, _ = cli_out(capsys, "approve", "safe")
    assert code == 1  # nothing held any more


def test_dry_run_stores_plan_and_report_without_applying(imported, capsys):
    env, district, before = imported
    night2, leavers = remove_students(district, 0.05, seed=9)
    deliver(env, night2)
    outcome = env.run("safe", dry_run=True)
    assert outcome.state == "dry_run" and outcome.exit_code == 0
    assert outcome.report["counts"]["users"]["archive"] == len(leavers)
    assert sorted(outcome.report["affected"]["users"]["archive"]) == sorted(leavers)
    assert env.snapshot("safe") == before


def test_a_school_missing_from_the_delivery_keeps_its_users(imported):
    env, district, before = imported
    school = "safe-sch-0002"
    frames = dict(district.frames)
    users = frames["users"]
    in_school = users["orgSourcedIds"].str.split(",").map(lambda ids: school in ids)
    classes = frames["classes"]
    frames["orgs"] = frames["orgs"][frames["orgs"]["sourcedId"] != school]
    frames["users"] = users[~in_school]
    frames["classes"] = classes[classes["schoolSourcedId"] != school]
    frames["enrollments"] = frames["enrollments"][
        frames["enrollments"]["schoolSourcedId"] != school
    ]
    partial = GeneratedDistrict(district.spec, frames)
    deliver(env, partial)
    outcome = env.run("safe")
    # The school's users are out of scope: nothing is archived, so nothing to hold either.
    assert outcome.state == "no_changes", outcome.report
    assert any(
        i["sourced_id"] == school and "school not delivered" in i["message"]
        for i in outcome.report["issues"]
    )
    assert env.snapshot("safe") == before


def test_an_update_storm_is_held(imported):
    env, district, before = imported
    storm, renamed = rename_users(district, 0.9, seed=5)
    deliver(env, storm)
    outcome = env.run("safe")
    assert outcome.state == "held", outcome.report
    assert any(h["entity"] == "users" and h["action"] == "update" for h in outcome.report["holds"])
    assert len(renamed) > 0.75 * len(district.frames["users"])
    assert env.snapshot("safe") == before


def test_thresholds_configured_per_district_take_effect(imported, capsys):
    env, district, _ = imported
    night2, leavers = remove_students(district, 0.05, seed=2)
    deliver(env, night2)
    code, _ = cli_out(
        capsys, "district", "set", "safe", "--thresholds", '{"users": {"archive": {"count": 3}}}'
    )
    assert code == 0
    held = env.run("safe")
    assert held.state == "held"
    assert held.report["holds"][0]["limit"] == "3 records"
    cli_out(capsys, "discard", "safe")
    # Settings are merged: the users limit stays until removed with null.
    cli_out(
        capsys,
        "district",
        "set",
        "safe",
        "--thresholds",
        '{"users": null, "*": {"archive": {"percent": 50}}}',
    )
    applied = env.run("safe")
    assert applied.state == "applied", applied.report
    assert applied.report["counts"]["users"]["archive"] == len(leavers)


def test_undo_of_the_latest_run_gives_back_the_previous_snapshot(imported, capsys):
    env, district, before = imported
    night2, _ = remove_students(district, 0.04, seed=6)
    night2, _ = rename_users(night2, 0.05, seed=7)
    users = night2.frames["users"]
    newcomer = users[users["role"].eq("student")].head(1).copy()
    newcomer[["sourcedId", "username", "email", "identifier"]] = [
        "NEWCOMER",
        "newcomer",
        "",
        "99999",
    ]
    night2 = GeneratedDistrict(
        night2.spec, {**night2.frames, "users": pd.concat([users, newcomer], ignore_index=True)}
    )
    deliver(env, night2)
    second = env.run("safe")
    assert second.state == "applied"
    counts = second.report["counts"]["users"]
    assert counts["create"] == 1 and counts["archive"] > 0 and counts["update"] > 0
    assert env.snapshot("safe") != before
    code, out = cli_out(capsys, "undo", "safe", "--run", second.run_id, "--by", "support")
    assert code == 0, out
    assert env.snapshot("safe") == before
    # The undo is itself a recorded run, and the undone run is marked.
    code, out = cli_out(capsys, "report", "safe", "--format", "json")
    report = json.loads(out)
    assert report["reverted_runs"] == [second.run_id]
    # Undo restores the stored row hashes exactly (and the state snapshot with them): the
    # delivery the roster was undone to is, again, no change at all.
    assert_snapshot_matches_tables(env.engine(), "safe")
    deliver(env, district)
    again = env.run("safe")
    assert again.state == "no_changes", again.report


def test_returning_student_with_new_sourced_id_is_flagged_not_duplicated(imported, capsys):
    env, district, _before = imported
    users = district.frames["users"].copy()
    student = users.index[users["role"].eq("student")][0]
    old_id = users.at[student, "sourcedId"]
    users.at[student, "sourcedId"] = "NEW-" + old_id
    enrollments = district.frames["enrollments"].copy()
    enrollments.loc[enrollments["userSourcedId"].eq(old_id), "userSourcedId"] = "NEW-" + old_id
    deliver(
        env,
        GeneratedDistrict(
            district.spec, {**district.frames, "users": users, "enrollments": enrollments}
        ),
    )
    outcome = env.run("safe")
    assert outcome.state == "applied", outcome.report
    flagged = outcome.report["possible_duplicates"]
    assert {"sourcedId": "NEW-" + old_id, "matches": old_id, "field": "username"} in flagged
    snapshot = env.snapshot("safe")
    ids = {u["sourcedId"] for u in snapshot["users"]}
    assert "NEW-" + old_id not in ids  # not created as a second account
    usernames = [u["username"] for u in snapshot["users"]]
    assert len(usernames) == len(set(usernames))
    code, out = cli_out(capsys, "duplicates", "safe")
    assert code == 0 and old_id in out


def test_report_csv_is_spreadsheet_safe(imported, capsys):
    code, out = cli_out(capsys, "report", "safe", "--format", "csv")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["severity", "file", "line", "column", "sourcedId", "message"]
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


def _with_users(district: GeneratedDistrict, users: pd.DataFrame, **frames) -> GeneratedDistrict:
    return GeneratedDistrict(district.spec, {**district.frames, "users": users, **frames})


def _students(users: pd.DataFrame) -> list[int]:
    return list(users.index[users["role"].eq("student")])


def _assert_usernames_unique_and_enrollments_point_at_accounts(snapshot: dict) -> None:
    usernames = [u["username"] for u in snapshot["users"]]
    assert len(usernames) == len(set(usernames))
    accounts = {u["sourcedId"] for u in snapshot["users"]}
    live = [e for e in snapshot["enrollments"] if e["status"] == "active"]
    assert {e["user"] for e in live} <= accounts


def test_an_update_to_a_username_another_account_holds_is_not_applied(imported):
    env, district, before = imported
    users = district.frames["users"].copy()
    a, b, c, d = _students(users)[:4]
    taken = users.at[b, "username"]
    # B leaves (archived, its account keeps its username); A is renamed onto it: refused.
    users.at[a, "username"] = taken
    users.at[a, "familyName"] = "Renamed"
    # C and D swap usernames in the same delivery: fine, both are unique afterwards.
    users.loc[[c, d], "username"] = users.loc[[d, c], "username"].to_numpy()
    deliver(env, _with_users(district, users.drop(index=b)))
    outcome = env.run("safe")
    assert outcome.state == "applied", outcome.report
    warnings = [i["message"] for i in outcome.report["issues"] if i["column"] == "username"]
    assert any(f"username {taken} is already used by account" in m for m in warnings), warnings
    after = {u["sourcedId"]: u for u in env.snapshot("safe")["users"]}
    old = {u["sourcedId"]: u for u in before["users"]}
    a_id, c_id, d_id = (users.at[i, "sourcedId"] for i in (a, c, d))
    assert after[a_id] == old[a_id]  # left exactly as it was
    assert (after[c_id]["username"], after[d_id]["username"]) == (
        old[d_id]["username"],
        old[c_id]["username"],
    )
    _assert_usernames_unique_and_enrollments_point_at_accounts(env.snapshot("safe"))


def test_allowing_a_separate_account_still_needs_its_own_username(imported, capsys):
    env, district, _before = imported
    users = district.frames["users"].copy()
    student = _students(users)[0]
    old_id = users.at[student, "sourcedId"]
    new_id = "NEW-" + old_id
    # The SIS re-created the student under a new sourcedId, same username; its enrollment rows
    # now point at the new id (updates of existing enrollments) or are new rows.
    users.at[student, "sourcedId"] = new_id
    enrollments = district.frames["enrollments"].copy()
    theirs = enrollments.index[enrollments["userSourcedId"].eq(old_id)]
    moved_id = enrollments.at[theirs[0], "sourcedId"]
    enrollments.loc[theirs, "userSourcedId"] = new_id
    extra = enrollments.loc[theirs[:1]].assign(sourcedId="NEW-" + moved_id)
    delivery = _with_users(
        district, users, enrollments=pd.concat([enrollments, extra], ignore_index=True)
    )
    deliver(env, delivery)
    first = env.run("safe")
    assert first.state == "applied", first.report
    assert new_id in {d["sourcedId"] for d in first.report["possible_duplicates"]}
    snapshot = env.snapshot("safe")
    moved = next(e for e in snapshot["enrollments"] if e["sourcedId"] == moved_id)
    assert moved["user"] == old_id  # not moved onto an account that was not created
    assert "NEW-" + moved_id not in {e["sourcedId"] for e in snapshot["enrollments"]}
    _assert_usernames_unique_and_enrollments_point_at_accounts(snapshot)

    # Support says it is a different person: it is still not created with a taken username...
    code, _ = cli_out(capsys, "duplicates", "safe", "--allow", new_id)
    assert code == 0
    second = env.run("safe")
    messages = [i["message"] for i in second.report["issues"] if i["sourced_id"] == new_id]
    assert any("is already used by account" in m and "not created" in m for m in messages)
    assert new_id not in {u["sourcedId"] for u in env.snapshot("safe")["users"]}
    # ... and is created, with its enrollments, once the SIS gives it a username of its own.
    users.at[student, "username"] = "newcomer.own"
    deliver(env, _with_users(district, users, enrollments=delivery.frames["enrollments"]))
    third = env.run("safe")
    assert third.state == "applied", third.report
    snapshot = env.snapshot("safe")
    assert new_id in {u["sourcedId"] for u in snapshot["users"]}
    moved = next(e for e in snapshot["enrollments"] if e["sourcedId"] == moved_id)
    assert (moved["user"], moved["status"]) == (new_id, "active")
    _assert_usernames_unique_and_enrollments_point_at_accounts(snapshot)
