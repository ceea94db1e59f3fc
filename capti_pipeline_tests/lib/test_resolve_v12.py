"""OneRoster 1.2 roles.csv → Capti roles and schools, and the 1.1 ↔ 1.2 equivalence."""

import itertools
from pathlib import Path

import pandas as pd
import pytest

from capti_pipeline.lib.resolve import ResolvedRoster, resolve_roster
from capti_pipeline.lib.validate import KnownRecords, validate_delivery
from capti_pipeline_tests.fixtures.deliveries import Delivery, baseline
from capti_pipeline_tests.support.harness import snapshot_without_ids

_counter = itertools.count()


def resolve(delivery: Delivery, tmp_path: Path) -> ResolvedRoster:
    validated = validate_delivery(delivery.write(tmp_path / f"d{next(_counter)}"))
    assert not validated.refused, [i.one_line() for i in validated.issues]
    return resolve_roster(validated)


def roles_of(roster: ResolvedRoster) -> dict[str, tuple[str, str]]:
    users = roster.frames["users"]
    return {r.sourcedId: (r.role, r.locations) for r in users.itertuples(index=False)}


def only_roles(delivery: Delivery, sourced_id: str, *rows: tuple[str, str, str]) -> Delivery:
    """Replace a user's roles.csv rows with (roleType, role, org) rows."""
    roles = delivery.files["roles.csv"]
    roles.rows = [r for r in roles.rows if r["userSourcedId"] != sourced_id]
    for n, (role_type, role, org) in enumerate(rows, start=1):
        roles.rows.append(
            {
                "sourcedId": f"x-{sourced_id}-{n}",
                "userSourcedId": sourced_id,
                "roleType": role_type,
                "role": role,
                "orgSourcedId": org,
            }
        )
    return delivery


def test_1_1_and_1_2_resolve_to_the_same_roster(tmp_path):
    v11, v12 = resolve(baseline("1.1"), tmp_path), resolve(baseline("1.2"), tmp_path)
    for entity in ("locations", "users", "classes", "enrollments"):
        pd.testing.assert_frame_equal(v11.frames[entity], v12.frames[entity], check_dtype=False)
    assert roles_of(v12) == {
        "t1": ("teacher", "s1"),
        "t2": ("teacher", "s2"),
        "0071": ("student", "s1"),
        "0072": ("student", "s1"),
        "0073": ("student", "s2"),
        "0074": ("student", "s1,s2"),
        "sa1": ("school_admin", "s1,s2"),
        "da1": ("district_admin", "s1"),
    }


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([("primary", "districtAdministrator", "d1")], ("district_admin", "")),
        ([("primary", "systemAdministrator", "d1")], ("district_admin", "")),
        ([("primary", "siteAdministrator", "s1")], ("school_admin", "s1")),
        ([("primary", "principal", "s2")], ("school_admin", "s2")),
        ([("primary", "systemAdministrator", "s2")], ("school_admin", "s2")),
        # district wins over school, whichever row is primary
        (
            [("primary", "principal", "s1"), ("secondary", "districtAdministrator", "d1")],
            ("district_admin", "s1"),
        ),
        (
            [("primary", "districtAdministrator", "d1"), ("secondary", "principal", "s2")],
            ("district_admin", "s2"),
        ),
        # an admin role outranks teaching; schools are the union of imported roles
        (
            [("primary", "teacher", "s1"), ("secondary", "principal", "s2")],
            ("school_admin", "s1,s2"),
        ),
        ([("primary", "student", "s2"), ("secondary", "teacher", "s1")], ("teacher", "s1,s2")),
        # roles Capti does not import add no school
        ([("primary", "teacher", "s1"), ("secondary", "guardian", "s2")], ("teacher", "s1")),
        ([("primary", "teacher", "s1"), ("secondary", "ext:coach", "s2")], ("teacher", "s1")),
        ([("primary", "teacher", "s1"), ("secondary", "counselor", "s2")], ("teacher", "s1")),
    ],
)
def test_role_mapping(tmp_path, rows, expected):
    roster = resolve(only_roles(baseline("1.2"), "t1", *rows), tmp_path)
    assert roles_of(roster)["t1"] == expected


def test_role_names_are_matched_case_insensitively(tmp_path):
    delivery = only_roles(baseline("1.2"), "t1", ("Primary", "DistrictAdministrator", "d1"))
    assert roles_of(resolve(delivery, tmp_path))["t1"] == ("district_admin", "")


def test_users_with_only_roles_capti_does_not_import_are_skipped_with_a_warning(tmp_path):
    delivery = only_roles(baseline("1.2"), "0073", ("primary", "guardian", "s2"))
    delivery.remove_row("enrollments.csv", "e6")
    roster = resolve(delivery, tmp_path)
    assert "0073" not in roles_of(roster)
    [warning] = [i for i in roster.issues if i.file == "roles.csv"]
    assert warning.severity == "warning"
    assert warning.message.startswith("1 user(s) without a role Capti imports")
    assert warning.message.endswith(": 0073")
    assert "0073" not in roster.protected["users"]  # a real skip: bulk may archive it


def test_tobedeleted_roles_do_not_count(tmp_path):
    delivery = only_roles(
        baseline("1.2"), "sa1", ("primary", "teacher", "s1"), ("secondary", "principal", "s2")
    )
    delivery.set("roles.csv", "x-sa1-2", "status", "tobedeleted")
    assert roles_of(resolve(delivery, tmp_path))["sa1"] == ("teacher", "s1")


def test_admin_at_an_org_capti_ignores_is_a_school_admin_without_school(tmp_path):
    delivery = baseline("1.2")
    delivery.add_row(
        "orgs.csv", sourcedId="dep1", name="Science", type="department", parentSourcedId="s1"
    )
    only_roles(delivery, "sa1", ("primary", "siteAdministrator", "dep1"))
    delivery.remove_row("enrollments.csv", "e8").remove_row("enrollments.csv", "e9")
    assert roles_of(resolve(delivery, tmp_path))["sa1"] == ("school_admin", "")
    # same as 1.1: administrator whose only org is a department
    v11 = baseline("1.1")
    v11.add_row(
        "orgs.csv", sourcedId="dep1", name="Science", type="department", parentSourcedId="s1"
    )
    v11.set("users.csv", "sa1", "orgSourcedIds", "dep1")
    v11.remove_row("enrollments.csv", "e8").remove_row("enrollments.csv", "e9")
    assert roles_of(resolve(v11, tmp_path))["sa1"] == ("school_admin", "")


def test_roles_at_orgs_known_only_to_the_store_resolve_by_their_stored_type(tmp_path):
    delivery = baseline("1.2")
    delivery.manifest["file.orgs"] = "absent"
    del delivery.files["orgs.csv"]
    validated = validate_delivery(delivery.write(tmp_path / "partial"), None)
    # without the store's org types the references are unknown...
    assert validated.row_errors()
    known = KnownRecords(org_types={"d1": "district", "s1": "school", "s2": "school"})
    validated = validate_delivery(delivery.write(tmp_path / "partial2"), known)
    assert validated.row_errors() == []
    roster = resolve_roster(validated, known.org_types)
    assert roles_of(roster)["da1"] == ("district_admin", "s1")


def test_delta_user_without_roles_rows_is_left_alone(tmp_path):
    delivery = baseline("1.2")
    delivery.files["users.csv"].rows = [delivery.files["users.csv"].row("t1")]
    delivery.files["users.csv"].rows[0]["status"] = "active"
    delivery.files["roles.csv"].rows = []
    for file in ("orgs.csv", "classes.csv", "enrollments.csv"):
        del delivery.files[file]
    delivery.manifest.update(
        {"file.orgs": "absent", "file.classes": "absent", "file.enrollments": "absent"}
    )
    delivery.manifest.update({"file.users": "delta", "file.roles": "delta"})
    roster = resolve(delivery, tmp_path)
    assert roster.frames["users"].empty
    assert any("without a roles.csv row in this delta" in i.message for i in roster.issues)
    assert roster.removals["users"] == set()


# -- through the real job ----------------------------------------------------------------------------


def test_same_district_in_1_1_and_1_2_gives_identical_snapshots(capti_env):
    for version in ("1.1", "1.2"):
        district = "v" + version.replace(".", "")
        capti_env.register(district, baseline(version).write(capti_env.delivery_dir(district)))
        outcome = capti_env.run(district)
        assert (outcome.state, outcome.report["error_count"]) == ("applied", 0)
    v11, v12 = capti_env.snapshot("v11"), capti_env.snapshot("v12")
    assert snapshot_without_ids(v11) == snapshot_without_ids(v12)
    labels = {u["sourcedId"]: u["roleLabel"] for u in v12["users"]}
    assert (labels["sa1"], labels["da1"], labels["t1"]) == (
        "School Admin",
        "District Admin",
        "Teacher",
    )
