"""How a delivery arrives: the channel (loose files, zip, SFTP) must not change the roster, and the
manifest's per-file mode (bulk, delta, absent) decides what a delivery may change. All through
real syncs (capti_env.run) over a baseline import."""

import os

import pytest

from capti_pipeline import service
from capti_pipeline.lib import store as st
from capti_pipeline.lib import sync
from capti_pipeline_tests.fixtures.deliveries import Delivery, as_delta, baseline
from capti_pipeline_tests.support.harness import snapshot_without_ids

# Small test districts: one archive is already more than the default 10 % hold.
PERMISSIVE = {"*": {"archive": {"percent": 100}, "update": {"percent": 100}}, "shrink_percent": 100}


def _imported(capti_env, district: str, delivery: Delivery) -> dict:
    drop = capti_env.delivery_dir(district)
    delivery.write(drop)
    capti_env.register(district, drop)
    with capti_env.engine().begin() as conn:
        st.upsert_district(conn, district, thresholds=PERMISSIVE)
    outcome = capti_env.run(district)
    assert (outcome.state, outcome.exit_code) == ("applied", 0), outcome.report["holds"]
    return capti_env.snapshot(district)


def _by_id(snapshot: dict, entity: str) -> dict[str, dict]:
    return {row["sourcedId"]: row for row in snapshot[entity]}


# -- channels ----------------------------------------------------------------------------------------


def test_zip_and_loose_files_give_identical_snapshots(capti_env):
    delivery = baseline()
    loose = _imported(capti_env, "loose", delivery)
    zipped_drop = capti_env.delivery_dir("zipped")
    delivery.write_zip(zipped_drop / "Maple_OneRoster_20250115.zip")
    capti_env.register("zipped", zipped_drop)
    outcome = capti_env.run("zipped")
    assert (outcome.state, outcome.exit_code) == ("applied", 0)
    assert snapshot_without_ids(capti_env.snapshot("zipped")) == snapshot_without_ids(loose)
    assert len(loose["users"]) == 8 and len(loose["enrollments"]) == 9


@pytest.mark.sftp
def test_sftp_delivery_gives_the_same_snapshot_as_local_files(capti_env, sshd_server):
    delivery = baseline()
    loose = _imported(capti_env, "loose", delivery)
    remote = {
        "sftp-loose": sshd_server.root / "maple-loose",
        "sftp-zip": sshd_server.root / "maple-zip",
    }
    delivery.write(remote["sftp-loose"])
    delivery.write_zip(remote["sftp-zip"] / "oneroster.zip")
    for district, folder in remote.items():
        os.chmod(folder, 0o700)
        capti_env.register(
            district,
            sshd_server.url(folder.name),
            sftp_key=str(sshd_server.client_key_path),
            known_hosts=str(sshd_server.known_hosts_path),
        )
        outcome = capti_env.run(district)
        assert (outcome.state, outcome.exit_code) == ("applied", 0), outcome.report["holds"]
        assert snapshot_without_ids(capti_env.snapshot(district)) == snapshot_without_ids(loose)


# -- manifest modes ----------------------------------------------------------------------------------


def test_bulk_archives_missing_records_only_inside_delivered_schools(capti_env):
    before = _imported(capti_env, "bulk", baseline())
    nightly = baseline()
    # 0071 left school s1; school s2 is not in this delivery at all (e.g. a permission change)
    nightly.remove_row("users.csv", "0071").remove_row("enrollments.csv", "e2")
    nightly.remove_row("orgs.csv", "s2")
    for sid in ("t2", "0073"):
        nightly.remove_row("users.csv", sid)
    for sid in ("0074", "sa1"):
        nightly.set("users.csv", sid, "orgSourcedIds", "s1")
    nightly.remove_row("classes.csv", "c2")
    for sid in ("e5", "e6", "e7", "e9"):
        nightly.remove_row("enrollments.csv", sid)
    nightly.write(capti_env.delivery_dir("bulk"))
    outcome = capti_env.run("bulk")
    assert (outcome.state, outcome.exit_code) == ("applied", 0), outcome.report["holds"]
    after = capti_env.snapshot("bulk")
    users, enrollments = _by_id(after, "users"), _by_id(after, "enrollments")
    assert users["0071"]["status"] == "archived"
    assert enrollments["e2"]["status"] == "archived"
    # outside the delivered schools nothing is archived
    for sid in ("t2", "0073"):
        assert users[sid] == _by_id(before, "users")[sid]
    assert _by_id(after, "classes")["c2"] == _by_id(before, "classes")["c2"]
    for sid in ("e5", "e6", "e7", "e9"):
        assert enrollments[sid] == _by_id(before, "enrollments")[sid]
    assert _by_id(after, "locations")["s2"]["status"] == "active"
    assert users["0074"]["locations"] == ["s1"]
    warning = [i for i in outcome.report["issues"] if i["sourced_id"] == "s2"]
    assert warning and "school not delivered" in warning[0]["message"]


def test_delta_upserts_active_removes_tobedeleted_and_leaves_the_rest(capti_env):
    before = _imported(capti_env, "delta", baseline())
    source = baseline()
    source.set("users.csv", "0072", "familyName", "Fothergill-Smythe")
    source.set("users.csv", "0073", "status", "tobedeleted")
    source.set("users.csv", "0074", "status", "inactive")  # legacy 1.0 spelling of tobedeleted
    source.add_row(
        "users.csv",
        sourcedId="0075",
        enabledUser="true",
        orgSourcedIds="s1",
        role="student",
        username="new.student",
        givenName="New",
        familyName="Student",
        grades="09",
    )
    source.set("enrollments.csv", "e3", "status", "tobedeleted")
    source.add_row(
        "enrollments.csv",
        sourcedId="e10",
        classSourcedId="c1",
        schoolSourcedId="s1",
        userSourcedId="0075",
        role="student",
    )
    # orgs and classes come as delta files without rows: declaring them absent would make the
    # completeness rule hold the plan (tested in test_absent_files_are_left_untouched)
    delta = as_delta(
        source,
        {
            "users.csv": lambda r: r["sourcedId"] in {"0072", "0073", "0074", "0075"},
            "enrollments.csv": lambda r: r["sourcedId"] in {"e3", "e10"},
            "orgs.csv": lambda r: False,
            "classes.csv": lambda r: False,
        },
    )
    assert set(delta.manifest[f"file.{f}"] for f in ("orgs", "users", "classes")) == {"delta"}
    delta.write(capti_env.delivery_dir("delta"))
    outcome = capti_env.run("delta")
    assert (outcome.state, outcome.exit_code) == ("applied", 0), outcome.report["holds"]
    assert outcome.report["error_count"] == 0
    assert any("legacy status 'inactive'" in i["message"] for i in outcome.report["issues"])

    old_users, users = _by_id(before, "users"), _by_id(capti_env.snapshot("delta"), "users")
    enrollments = _by_id(capti_env.snapshot("delta"), "enrollments")
    assert users["0072"]["familyName"] == "Fothergill-Smythe"
    assert users["0073"]["status"] == users["0074"]["status"] == "archived"
    assert users["0075"]["status"] == "active" and users["0075"]["locations"] == ["s1"]
    for sid in ("t1", "t2", "0071", "sa1", "da1"):  # absent from the delta: unchanged
        assert users[sid] == old_users[sid]
    assert enrollments["e3"]["status"] == "archived"
    assert enrollments["e10"]["status"] == "active"
    # enrollments of removed users end with them; the others are unchanged
    assert {enrollments[e]["status"] for e in ("e4", "e6", "e7")} == {"archived"}
    assert {enrollments[e]["status"] for e in ("e1", "e2", "e5", "e8", "e9")} == {"active"}


def test_absent_files_are_left_untouched(capti_env):
    before = _imported(capti_env, "absent", baseline())
    nightly = baseline()
    nightly.set("classes.csv", "c1", "title", "Algebra I (honours)")
    nightly.set("users.csv", "0071", "familyName", "Changed")  # must NOT be read
    nightly.remove_file("users.csv").remove_file("enrollments.csv")
    nightly.manifest.update({"file.users": "absent", "file.enrollments": "absent"})
    nightly.write(capti_env.delivery_dir("absent"))
    outcome = capti_env.run("absent")
    # The last applied delivery had users.csv: the safety rules hold the plan for a human.
    assert (outcome.state, outcome.exit_code) == ("held", 3), outcome.report
    assert capti_env.snapshot("absent") == before
    approved = sync.approve_held_plan(capti_env.engine(), "absent", service.new_run_id(), "test")
    assert approved["state"] == "applied"
    after = capti_env.snapshot("absent")
    assert _by_id(after, "classes")["c1"]["title"] == "Algebra I (honours)"
    assert after["users"] == before["users"]
    assert after["enrollments"] == before["enrollments"]
