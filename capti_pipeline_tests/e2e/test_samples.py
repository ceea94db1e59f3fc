"""Every public sample in /work/shared/oneroster-samples ends in the outcome its README states,
through a real sync (capti_env.run): the Ed-Fi set imports, the deliberately messy Moodle sets end
in a clear report, the non-standard oat-sa set is refused naming its missing columns."""

from pathlib import Path

import pytest

from capti_pipeline.lib import report as rp
from capti_pipeline_tests.support.harness import EDFI, SAMPLES

MOODLE = SAMPLES / "catalyst__moodle-enrol_oneroster"
OAT = SAMPLES / "oat-sa__oneroster-import" / "OneRosterv1p1BaseCSV"


def _sync(capti_env, district_id: str, source: Path):
    capti_env.register(district_id, source)
    outcome = capti_env.run(district_id)
    report = outcome.report
    # A clear report, whatever the outcome: never a crash, never a stack trace in it.
    assert outcome.state != "failed", report
    assert "Traceback" not in repr(report)
    assert report["error_count"] == sum(i["severity"] == "error" for i in report["issues"])
    for issue in report["issues"]:
        assert issue["file"] and issue["message"]
    rp.to_csv(report)  # the downloadable form renders too
    return outcome


def _issue(report: dict, **match: object) -> dict:
    found = [i for i in report["issues"] if all(i[k] == v for k, v in match.items())]
    assert found, f"no issue {match} in {report['issues']}"
    return found[0]


def test_edfi_sample_imports_cleanly(capti_env):
    outcome = _sync(capti_env, "edfi", EDFI)
    assert (outcome.state, outcome.exit_code) == ("applied", 0)
    assert outcome.report["error_count"] == 0
    snapshot = capti_env.snapshot("edfi")
    assert len(snapshot["users"]) == 10
    assert len(snapshot["enrollments"]) == 24
    # ids are exact strings: leading zeros and upper-case GUIDs survive
    assert "03100500" not in {u["sourcedId"] for u in snapshot["users"]}
    assert "6F4283DC-F831-4437-A9A3-E030C7AF0493" in {
        e["sourcedId"] for e in snapshot["enrollments"]
    }
    # the quirks are reported as warnings with their lines
    ragged = _issue(outcome.report, file="users.csv", line=10)
    assert (ragged["severity"], ragged["sourced_id"]) == ("warning", "207270")
    assert "extra empty cell" in ragged["message"]
    assert _issue(outcome.report, file="users.csv", line=0)["message"].startswith("no newline")


@pytest.mark.parametrize("name", ["Test_full_data_set", "Test_minimal_data_set"])
def test_moodle_1_1_sets_apply_what_is_valid_and_report_the_rest(capti_env, name):
    outcome = _sync(capti_env, "moodle11", MOODLE / name)
    assert (outcome.state, outcome.exit_code) == ("applied", 0)
    report = outcome.report
    # Its only org is a department, so its classes cannot attach to a school.
    error = _issue(report, file="classes.csv", line=2, column="schoolSourcedId")
    assert error["sourced_id"] == "cls-222-123456"
    assert "is an org of type department, not a school" in error["message"]
    assert "parent skipped" in _issue(report, file="users.csv", column="role")["message"]
    snapshot = capti_env.snapshot("moodle11")
    # TRUE/FALSE were accepted: five users imported (the parent is skipped), none enrolled
    assert len(snapshot["users"]) == 5
    assert all(u["enabled"] for u in snapshot["users"])
    assert snapshot["classes"] == [] and snapshot["enrollments"] == []


def test_moodle_1_2_delta_set_is_read_with_roles(capti_env):
    outcome = _sync(capti_env, "moodle12delta", MOODLE / "oneroster_test_data")
    assert (outcome.state, outcome.exit_code) == ("applied", 0)
    assert outcome.report["error_count"] == 0
    [user] = capti_env.snapshot("moodle12delta")["users"]
    assert (user["sourcedId"], user["role"], user["locations"]) == ("USER_0", "student", ["ORG_1"])
    assert "Batman" not in repr(outcome.report)  # its password never reaches the report


def test_moodle_1_2_full_set_with_misspelt_headers_is_refused(capti_env):
    outcome = _sync(capti_env, "moodle12", MOODLE / "v1p2_full_dataset")
    assert (outcome.state, outcome.exit_code) == ("refused", 2)
    report = outcome.report
    users = _issue(report, file="users.csv", severity="error")
    assert users["column"] == "preferredGivenName,preferredMiddleName,preferredFamilyName"
    assert "preferredGivenName (is 'prefferedGivenName' a misspelling?)" in users["message"]
    roles = _issue(report, file="roles.csv", severity="error")
    assert roles["column"] == "dateLastModified,userProfileSourcedId"
    assert "users.csv" in report["reason"] and "roles.csv" in report["reason"]
    assert capti_env.snapshot("moodle12")["users"] == []


def test_oat_sa_set_is_refused_naming_its_missing_columns(capti_env):
    outcome = _sync(capti_env, "oat", OAT)
    assert (outcome.state, outcome.exit_code) == ("refused", 2)
    report = outcome.report
    expected = {
        "users.csv": "userIds,middleName,agentSourcedIds,grades,password",
        "classes.csv": "grades,subjectCodes,periods",
        "enrollments.csv": "beginDate,endDate",
    }
    for file, columns in expected.items():
        issue = _issue(report, file=file, severity="error")
        assert issue["line"] == 0
        assert issue["column"] == columns
        assert issue["message"].startswith("missing required column(s) for OneRoster 1.1: ")
        assert file in report["reason"]
    assert capti_env.snapshot("oat") == {
        "district": "oat",
        "locations": [],
        "users": [],
        "classes": [],
        "enrollments": [],
    }
