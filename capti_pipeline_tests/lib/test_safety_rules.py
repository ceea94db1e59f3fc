import pandas as pd

from capti_pipeline.lib.diff import Plan, empty_changes
from capti_pipeline.lib.resolve import ENTITIES
from capti_pipeline.lib.safety import check_completeness, check_thresholds, effective_thresholds

LAST = {"orgs.csv": 3, "users.csv": 1000, "classes.csv": 50, "enrollments.csv": 6000}
BULK = {f: "bulk" for f in LAST}


def plan_with(entity: str, action: str, count: int) -> Plan:
    changes = {e: empty_changes(e) for e in ENTITIES}
    changes[entity] = pd.DataFrame(
        {"action": [action] * count, "sourcedId": [f"x{i}" for i in range(count)]}
    )
    return Plan("d", 1, changes)


def test_default_thresholds_hold_over_ten_percent_archives_and_75_percent_updates():
    active = {"users": 100, "enrollments": 600, "classes": 10, "locations": 3}
    assert check_thresholds(plan_with("users", "archive", 10), active) == []
    [hold] = check_thresholds(plan_with("users", "archive", 11), active)
    assert (hold.entity, hold.action, hold.count, hold.limit) == ("users", "archive", 11, "10%")
    assert check_thresholds(plan_with("users", "update", 75), active) == []
    assert check_thresholds(plan_with("users", "update", 76), active)[0].action == "update"
    # First import: nothing active yet, nothing held.
    assert check_thresholds(plan_with("users", "archive", 50), {"users": 0}) == []


def test_district_overrides_layer_over_defaults():
    limits = effective_thresholds(
        {"*": {"create": {"count": 5}}, "users": {"archive": {"percent": 2}}}
    )
    assert limits["users"]["archive"] == {"percent": 2}
    assert limits["classes"]["archive"] == {"percent": 10.0}
    assert limits["enrollments"]["create"] == {"count": 5}
    held = check_thresholds(
        plan_with("classes", "create", 6), {"classes": 100}, {"*": {"create": {"count": 5}}}
    )
    assert held[0].limit == "5 records"


def test_completeness_holds_a_bulk_snapshot_missing_a_file_or_shrunk():
    modes = {**BULK, "enrollments.csv": "absent"}
    rows = {"orgs.csv": 3, "users.csv": 1000, "classes.csv": 50}
    [missing] = check_completeness(rows, modes, LAST)
    assert (missing.entity, missing.action) == ("enrollments.csv", "missing")
    [shrunk] = check_completeness({**LAST, "users.csv": 400}, BULK, LAST)
    assert (shrunk.entity, shrunk.action) == ("users.csv", "shrank")
    assert check_completeness({**LAST, "users.csv": 600}, BULK, LAST) == []


def test_a_delta_package_may_leave_files_absent():
    modes = {
        "orgs.csv": "absent",
        "users.csv": "delta",
        "classes.csv": "absent",
        "enrollments.csv": "delta",
    }
    assert check_completeness({"users.csv": 3, "enrollments.csv": 2}, modes, LAST) == []
