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
from capti_pipeline_tests.support.harness import CaptiEnv
from capti_pipeline_tests.support.state_check import assert_snapshot_matches_tables

SPEC = DistrictSpec(district_id="safe", students=240, students_per_school=80, seed=3)


def deliver(env: CaptiEnv, district: GeneratedDistrict) -> Path:
    folder = env.root / "drop" / "safe"
    if folder.exists():
        for path in folder.iterdir():
            path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_delivery(district, folder)
    return folder


def cut_users(folder: Path, keep_fraction: float) -> int:
    """Keep only the first share of users.csv rows, as a broken export would."""
    path = folder / "users.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = max(1, int((len(lines) - 1) * keep_fraction))
    path.write_text("".join(lines[: 1 + keep]), encoding="utf-8")
    return keep


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
    kept = cut_users(folder, 0.10)
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
    assert len(archived) == len(district.frames["users"]) - kept
    code, out = cli_out(capsys, "status", "safe", "--json")
    assert json.loads(out)["state"] == "applied"


def test_discard_leaves_the_roster_as_it_was(imported, capsys):
    env, _, before = imported
    cut_users(env.root / "drop" / "safe", 0.10)
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
