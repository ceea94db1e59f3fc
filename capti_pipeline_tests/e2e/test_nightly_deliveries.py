"""A generated district over several nightly deliveries, through the real Dagster job."""

from pathlib import Path

import pytest

from capti_pipeline.lib.generator import (
    DistrictSpec,
    GeneratedDistrict,
    add_back,
    generate_district,
    move_students,
    remove_students,
    rename_users,
    write_delivery,
)
from capti_pipeline_tests.support.harness import CaptiEnv, snapshot_without_ids
from capti_pipeline_tests.support.state_check import assert_snapshot_matches_tables

SPEC = DistrictSpec(district_id="gen", students=300, students_per_school=100, seed=11)


def deliver(env: CaptiEnv, district: GeneratedDistrict, night: str, **options: bool) -> Path:
    """Replace the district's drop folder with this night's files, as ClassLink does."""
    folder = env.root / "drop" / "gen"
    if folder.exists():
        for path in folder.iterdir():
            path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_delivery(district, folder, **options)
    return folder


def users_by_id(snapshot: dict) -> dict[str, dict]:
    return {u["sourcedId"]: u for u in snapshot["users"]}


@pytest.fixture
def first_night(capti_env: CaptiEnv) -> tuple[CaptiEnv, GeneratedDistrict, dict]:
    district = generate_district(SPEC)
    capti_env.register("gen", deliver(capti_env, district, "night-1"))
    outcome = capti_env.run("gen")
    assert outcome.state == "applied", outcome.report
    return capti_env, district, capti_env.snapshot("gen")


def test_first_import_follows_capti_rules(first_night):
    _, district, snapshot = first_night
    users = district.frames["users"]
    orgs = district.frames["orgs"]
    by_id = users_by_id(snapshot)
    assert len(by_id) == len(users)  # students, teachers and admins are all imported
    assert all(u["status"] == "active" for u in by_id.values())

    # Locations: schools and the district; the department org is ignored.
    location_types = {loc["sourcedId"]: loc["type"] for loc in snapshot["locations"]}
    assert set(location_types.values()) == {"school", "district"}
    assert set(orgs["sourcedId"][orgs["type"].eq("department")]).isdisjoint(location_types)
    assert len(location_types) == int(orgs["type"].isin(["school", "district"]).sum())

    district_org = orgs["sourcedId"][orgs["type"].eq("district")].iloc[0]
    for row in users.itertuples(index=False):
        user = by_id[row.sourcedId]
        org_ids = row.orgSourcedIds.split(",")
        schools = sorted(o for o in org_ids if location_types.get(o) == "school")
        assert user["locations"] == schools
        assert user["enabled"] is (row.enabledUser == "true")
        if row.role == "administrator":
            expected = "district_admin" if district_org in org_ids else "school_admin"
            assert user["role"] == expected, row.sourcedId
            assert (
                user["roleLabel"]
                == {"district_admin": "District Admin", "school_admin": "School Admin"}[expected]
            )
        else:
            assert user["role"] == row.role

    roles = {u["role"] for u in by_id.values()}
    assert roles == {"student", "teacher", "school_admin", "district_admin"}
    # The admin listed at a school AND the district is a District Admin with that school.
    both = [u for u in by_id.values() if u["role"] == "district_admin" and u["locations"]]
    assert both
    multi_school = [u for u in by_id.values() if len(u["locations"]) >= 2]
    assert multi_school and multi_school[0]["role"] == "teacher"
    assert any(not u["enabled"] for u in by_id.values())
    assert len(snapshot["enrollments"]) == len(district.frames["enrollments"])
    # Passwords are never stored: no snapshot field carries one.
    assert all("password" not in u for u in by_id.values())


def test_nightly_changes_archive_move_rename_and_restore(first_night):
    env, night1, before = first_night
    before_users = users_by_id(before)

    night2, leavers = remove_students(night1, 0.03, seed=1)
    night2, movers = move_students(night2, 0.03, seed=2)
    night2, renamed = rename_users(night2, 0.0, seed=3, role="teacher")
    if not renamed:  # at least one teacher renamed
        night2, renamed = rename_users(night2, 1 / 15, seed=3, role="teacher")
    renamed = renamed[:1] if len(renamed) > 1 else renamed
    deliver(env, night2, "night-2")
    outcome = env.run("gen")
    assert outcome.state == "applied", outcome.report
    counts = outcome.report["counts"]
    assert counts["users"]["archive"] == len(leavers)
    assert counts["users"]["create"] == 0

    after = env.snapshot("gen")
    after_users = users_by_id(after)
    for sourced_id in leavers:
        assert after_users[sourced_id]["status"] == "archived"
        assert after_users[sourced_id]["accountId"] == before_users[sourced_id]["accountId"]
    leaver_enrollments = [e for e in after["enrollments"] if e["user"] in set(leavers)]
    assert leaver_enrollments and all(e["status"] == "archived" for e in leaver_enrollments)

    new_orgs = dict(
        zip(
            night2.frames["users"]["sourcedId"],
            night2.frames["users"]["orgSourcedIds"],
            strict=True,
        )
    )
    for sourced_id in movers:
        assert after_users[sourced_id]["locations"] == [new_orgs[sourced_id]]
        assert after_users[sourced_id]["locations"] != before_users[sourced_id]["locations"]
        active_classes = {
            e["class"]
            for e in after["enrollments"]
            if e["user"] == sourced_id and e["status"] == "active"
        }
        expected = set(
            night2.frames["enrollments"]["classSourcedId"][
                night2.frames["enrollments"]["userSourcedId"].eq(sourced_id)
            ]
        )
        assert active_classes == expected

    new_family = dict(
        zip(night2.frames["users"]["sourcedId"], night2.frames["users"]["familyName"], strict=True)
    )
    for sourced_id in renamed:
        assert after_users[sourced_id]["familyName"] == new_family[sourced_id]
        assert after_users[sourced_id]["accountId"] == before_users[sourced_id]["accountId"]

    # Night 3: the leavers come back and are restored — same accounts, no duplicates.
    night3 = add_back(night2, night1, leavers)
    deliver(env, night3, "night-3")
    outcome = env.run("gen")
    assert outcome.state == "applied", outcome.report
    assert outcome.report["counts"]["users"]["restore"] == len(leavers)
    assert outcome.report["counts"]["users"]["create"] == 0
    restored = users_by_id(env.snapshot("gen"))
    assert len(restored) == len(before_users)
    for sourced_id in leavers:
        assert restored[sourced_id]["status"] == "active"
        assert restored[sourced_id]["accountId"] == before_users[sourced_id]["accountId"]

    # After three applies the recorded state snapshot still equals the tables.
    assert_snapshot_matches_tables(env.engine(), "gen")

    # The same delivery again changes nothing and says so.
    snapshot = env.snapshot("gen")
    again = env.run("gen")
    assert again.state == "no_changes" and again.exit_code == 0
    assert "already matches" in again.report["reason"]
    assert env.snapshot("gen") == snapshot


def test_bom_and_crlf_delivery_gives_the_same_roster(first_night):
    env, district, snapshot = first_night
    folder = env.root / "drop" / "bom"
    folder.mkdir(parents=True)
    write_delivery(district, folder, bom=True, crlf=True)
    assert (folder / "users.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert b"\r\n" in (folder / "users.csv").read_bytes()
    env.register("bom", folder)
    outcome = env.run("bom")
    assert outcome.state == "applied", outcome.report
    assert snapshot_without_ids(env.snapshot("bom")) == snapshot_without_ids(snapshot)


def test_districts_are_isolated(first_night):
    env, _district, snapshot = first_night
    other = generate_district(DistrictSpec(district_id="other", students=50, seed=5))
    folder = env.root / "drop" / "other"
    folder.mkdir(parents=True)
    write_delivery(other, folder)
    env.register("other", folder)
    assert env.run("other").state == "applied"
    assert env.snapshot("gen") == snapshot
