"""A held plan stays approvable until a later run applies changes or a newer hold replaces it
(then it is superseded); the completeness rule compares with the delivery the roster reflects,
also after an undo. Real Dagster runs of the district partition and the CLI in this process."""

import json

import sqlalchemy as sa

from capti_pipeline.lib import store as st
from capti_pipeline.lib.generator import (
    remove_students,
    rename_users,
    write_delivery,
)
from capti_pipeline_tests.support.harness import CaptiEnv
from capti_pipeline_tests.support.operator import (
    NO_THRESHOLDS,
    Cli,
    deliver,
    keep_users,
    run_record,
)


def stored_plan_entities(env: CaptiEnv, run_id: str) -> int:
    with env.engine().connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).where(
                st.run_payloads.c.run_id == run_id, st.run_payloads.c.kind == "plan"
            )
        ).scalar_one()


def status_of(cli_run: Cli, district_id: str) -> dict:
    code, out = cli_run("status", district_id, "--json")
    assert code == 0, out
    return json.loads(out)


# --- a held plan stays pending until an apply or a newer hold --------------------------------


def test_held_plan_survives_dry_runs_and_failed_or_refused_runs(hp_district, cli_run: Cli) -> None:
    env, district, folder = hp_district
    before = env.snapshot("hp")
    cut = keep_users(folder, 0.10)
    held = env.run("hp")
    assert held.state == "held" and held.exit_code == 3

    # Later runs that change nothing: a dry run (preview of the same delivery), a run whose
    # source folder is gone (failed), a delivery refused by validation.
    assert env.run("hp", dry_run=True).state == "dry_run"
    folder.rename(folder.with_name("hp-away"))
    failed = env.run("hp")
    folder.with_name("hp-away").rename(folder)
    assert failed.state == "failed", failed.report
    good_users = (folder / "users.csv").read_bytes()
    (folder / "users.csv").write_bytes(b"\xff\xfe not utf-8")
    assert env.run("hp").state == "refused"
    (folder / "users.csv").write_bytes(good_users)

    shown = status_of(cli_run, "hp")
    assert shown["state"] == "refused"  # the district's last outcome...
    assert shown["held"] is True and shown["held_run_id"] == held.run_id  # ...and the hold
    assert "users archive" in shown["held_reason"]
    code, out = cli_run("status", "hp")
    assert "hp: refused [HELD]" in out and f"held plan: run {held.run_id}" in out
    assert env.snapshot("hp") == before

    # Approve applies exactly the held plan, even though the folder changed meanwhile.
    write_delivery(district, folder)
    code, out = cli_run("approve", "hp", "--by", "support")
    assert code == 0, out
    after = {u["sourcedId"]: u for u in env.snapshot("hp")["users"]}
    assert {s for s, u in after.items() if u["status"] == "archived"} == set(cut)
    assert run_record(env, held.run_id).state == "approved"
    assert status_of(cli_run, "hp")["held"] is False
    code, out = cli_run("approve", "hp")
    assert code == 1 and "no held plan" in out


def test_a_newer_hold_supersedes_the_older_one(hp_district, cli_run: Cli) -> None:
    env, district, folder = hp_district
    before = env.snapshot("hp")
    keep_users(folder, 0.5)
    first = env.run("hp")
    assert first.state == "held"
    assert stored_plan_entities(env, first.run_id) > 0
    write_delivery(district, folder)
    cut = keep_users(folder, 0.2)
    second = env.run("hp")
    assert second.state == "held"

    older = run_record(env, first.run_id)
    assert older.state == "superseded" and second.run_id in (older.reason or "")
    assert stored_plan_entities(env, first.run_id) == 0  # its stored plan is dropped
    code, out = cli_run("report", "hp", "--run", first.run_id, "--format", "json")
    assert json.loads(out)["state"] == "superseded"
    shown = status_of(cli_run, "hp")
    assert (shown["held"], shown["held_run_id"]) == (True, second.run_id)
    assert env.snapshot("hp") == before

    code, out = cli_run("approve", "hp")
    assert code == 0, out
    archived = {u["sourcedId"] for u in env.snapshot("hp")["users"] if u["status"] == "archived"}
    assert archived == set(cut)  # the newer plan, not the older one


def test_a_later_apply_supersedes_the_held_plan(hp_district, cli_run: Cli) -> None:
    env, district, folder = hp_district
    keep_users(folder, 0.10)
    held = env.run("hp")
    assert held.state == "held"
    # The district fixes its export; the next night applies a few renames.
    renamed_district, _ = rename_users(district, 0.03, seed=4)
    deliver(env, renamed_district, "hp")
    applied = env.run("hp")
    assert applied.state == "applied" and applied.report["counts"]["users"]["update"] > 0

    record = run_record(env, held.run_id)
    assert record.state == "superseded" and applied.run_id in (record.reason or "")
    assert stored_plan_entities(env, held.run_id) == 0
    assert status_of(cli_run, "hp")["held"] is False
    after = env.snapshot("hp")
    code, out = cli_run("approve", "hp")
    assert code == 1 and "no held plan" in out and "superseded" in out
    assert env.snapshot("hp") == after
    code, out = cli_run("discard", "hp")
    assert code == 1 and "no held plan" in out


def test_approve_refuses_a_plan_whose_roster_version_is_stale(hp_district, cli_run: Cli) -> None:
    env, _, folder = hp_district
    before = env.snapshot("hp")
    keep_users(folder, 0.10)
    held = env.run("hp")
    assert held.state == "held"
    # Another writer slipped an apply in between (the version claim is what every apply takes).
    with env.engine().begin() as conn:
        st.claim_roster_version(conn, "hp", st.get_district(conn, "hp").roster_version)
    assert status_of(cli_run, "hp")["held"] is False  # computed against an older roster

    code, out = cli_run("approve", "hp")
    assert code == 1 and "the roster changed" in out and "nothing applied" in out
    assert env.snapshot("hp") == before
    assert run_record(env, held.run_id).state == "superseded"
    with env.engine().connect() as conn:
        [approve] = [r for r in st.list_runs(conn, "hp") if r.kind == "approve"]
    assert approve.state == "failed"


# --- completeness baseline -------------------------------------------------------------------


def test_completeness_rule_still_holds_after_an_undo(hp_district, cli_run: Cli) -> None:
    env, district, folder = hp_district
    code, out = cli_run("district", "set", "hp", "--thresholds", NO_THRESHOLDS)
    assert code == 0, out
    full_rows = len(district.frames["users"])
    night2, _ = remove_students(district, 0.04, seed=6)
    deliver(env, night2, "hp")
    second = env.run("hp")
    assert second.state == "applied"
    assert env.run("hp").state == "no_changes"  # against night 2's roster: does not count after
    code, out = cli_run("undo", "hp", "--run", second.run_id)
    assert code == 0, out
    before = env.snapshot("hp")

    write_delivery(district, folder)
    kept = len(district.frames["users"]) - len(keep_users(folder, 0.31))  # cut by 69 %
    outcome = env.run("hp")
    assert outcome.state == "held", outcome.report
    [hold] = [h for h in outcome.report["holds"] if h["entity"] == "users.csv"]
    assert hold["rule"] == "completeness" and hold["action"] == "shrank"
    # Compared with the delivery the roster reflects after the undo: the first one.
    assert f"shrank from {full_rows} to {kept} rows" in hold["message"]
    assert not [h for h in outcome.report["holds"] if h["rule"] == "threshold"]
    assert env.snapshot("hp") == before
