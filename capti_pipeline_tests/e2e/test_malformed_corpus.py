"""A corpus of malformed deliveries, each built by breaking one thing in a small valid district.

Every case: import the valid baseline, then sync the malformed delivery, and assert
- its exact error (file, line, column, message substring), and
- the roster: a refused delivery leaves the whole snapshot identical; a row-level problem leaves
  the rejected records identical while the rest of the delivery (an identifier change on `da1`)
  is applied.

All cases run through the lib sync stages (fixtures/store_sync.py: the same calls the assets make)
on a copy of a store the baseline was imported into once. A representative subset also runs
through the real Dagster job (capti_env.run), with exit codes, and the report's privacy and
spreadsheet safety are checked on a real run.
"""

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from capti_pipeline.lib import report as rp
from capti_pipeline.lib import sync
from capti_pipeline.lib.issues import Issue
from capti_pipeline_tests.fixtures.deliveries import PII_VALUES, Delivery, as_delta, baseline
from capti_pipeline_tests.fixtures.store_sync import (
    copy_store,
    open_store,
    register,
    sync_directory,
)

DISTRICT = "corpus"
LEGIT_ID = ("da1", "ID-da1-v2")  # every malformed delivery also carries this valid change


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Delivery], Delivery]
    file: str
    line: int
    column: str
    message: str
    # Row-level cases: records (entity, sourcedId) that must be identical to the baseline; a
    # record absent from the baseline must stay absent.
    untouched: tuple[tuple[str, str], ...] = ()
    version: str = "1.1"

    @property
    def refused(self) -> bool:
        return self.line == 0


def _raw(file: str, edit: Callable[[str], bytes]) -> Callable[[Delivery], Delivery]:
    def mutate(d: Delivery) -> Delivery:
        d.raw[file] = edit(d.text(file))
        return d

    return mutate


def _line_edit(file: str, line: int, old: str, new: str) -> Callable[[Delivery], Delivery]:
    def edit(text: str) -> bytes:
        lines = text.split("\n")
        assert old in lines[line - 1]
        lines[line - 1] = lines[line - 1].replace(old, new)
        return "\n".join(lines).encode()

    return _raw(file, edit)


def _manifest(**props: str) -> Callable[[Delivery], Delivery]:
    def mutate(d: Delivery) -> Delivery:
        d.manifest.update({k.replace("__", "."): v for k, v in props.items()})
        return d

    return mutate


def _user_row(sourced_id: str, username: str) -> dict[str, str]:
    return {
        "sourcedId": sourced_id,
        "enabledUser": "true",
        "orgSourcedIds": "s1",
        "role": "student",
        "username": username,
        "givenName": "Extra",
        "familyName": "Person",
    }


def _delta_users_with_blank_status(d: Delivery) -> Delivery:
    out = as_delta(d, {"users.csv": lambda row: True})
    out.set("users.csv", "0073", "status", "")
    return out


def _then(*steps: Callable[[Delivery], Delivery]) -> Callable[[Delivery], Delivery]:
    def mutate(d: Delivery) -> Delivery:
        for step in steps:
            d = step(d) or d
        return d

    return mutate


REFUSED = [
    Case(
        "missing-users-file",
        lambda d: d.remove_file("users.csv"),
        "users.csv",
        0,
        "",
        "manifest declares file.users=bulk but the file is missing",
    ),
    Case(
        "missing-orgs-file-unlisted",
        lambda d: d.remove_file("orgs.csv", from_manifest=True),
        "orgs.csv",
        0,
        "",
        "required file is missing",
    ),
    Case(
        "missing-column-givenName",
        lambda d: d.drop_column("users.csv", "givenName"),
        "users.csv",
        0,
        "givenName",
        "missing required column(s) for OneRoster 1.1: givenName",
    ),
    Case(
        "missing-column-enrollment-user",
        lambda d: d.drop_column("enrollments.csv", "userSourcedId"),
        "enrollments.csv",
        0,
        "userSourcedId",
        "missing required column(s) for OneRoster 1.1: userSourcedId",
    ),
    Case(
        "missing-column-classType",
        lambda d: d.drop_column("classes.csv", "classType"),
        "classes.csv",
        0,
        "classType",
        "missing required column(s)",
    ),
    Case(
        "misspelt-column",
        lambda d: d.rename_column("users.csv", "familyName", "famliyName"),
        "users.csv",
        0,
        "familyName",
        "familyName (is 'famliyName' a misspelling?)",
    ),
    Case(
        "invalid-utf8",
        _raw("users.csv", lambda t: t.replace("Cornelius", "Cornélius").encode("latin-1")),
        "users.csv",
        0,
        "",
        "not valid UTF-8 (byte 0xe9 on line 6)",
    ),
    Case(
        "utf16",
        _raw("orgs.csv", lambda t: t.encode("utf-16")),
        "orgs.csv",
        0,
        "",
        "the file is UTF-16 encoded; it must be saved as UTF-8",
    ),
    Case(
        "nul-bytes",
        _raw("classes.csv", lambda t: t.replace("Biology", "Bio\x00logy").encode()),
        "classes.csv",
        0,
        "",
        "contains NUL bytes (line 3)",
    ),
    Case(
        "empty-file",
        _raw("enrollments.csv", lambda t: b""),
        "enrollments.csv",
        0,
        "",
        "file is empty (no header row)",
    ),
    Case(
        "header-only-bulk-file",
        _raw("classes.csv", lambda t: t.split("\n")[0].encode() + b"\n"),
        "classes.csv",
        0,
        "",
        "bulk file has a header but no rows",
    ),
    Case(
        "absent-but-delivered",
        _manifest(file__users="absent"),
        "users.csv",
        0,
        "",
        "file delivered but the manifest declares file.users=absent",
    ),
    Case(
        "manifest-contradicts-users-header",
        _manifest(oneroster__version="1.2"),
        "users.csv",
        0,
        "role",
        "manifest.csv says OneRoster 1.2 but the users.csv header is OneRoster 1.1",
    ),
    Case(
        "bad-manifest-version",
        _manifest(manifest__version="2.0"),
        "manifest.csv",
        0,
        "value",
        "manifest.version must be 1.0 (got '2.0')",
    ),
    Case(
        "unsupported-oneroster-version",
        _manifest(oneroster__version="1.0"),
        "manifest.csv",
        0,
        "value",
        "oneroster.version must be 1.1 or 1.2 (got '1.0')",
    ),
    Case(
        "bad-file-mode",
        _manifest(file__classes="full"),
        "manifest.csv",
        0,
        "value",
        "file.classes must be bulk, delta or absent (got 'full')",
    ),
    Case(
        "manifest-bad-header",
        _raw("manifest.csv", lambda t: t.replace("propertyName,value", "name,value", 1).encode()),
        "manifest.csv",
        0,
        "",
        "header must be 'propertyName,value'",
    ),
    Case(
        "manifest-property-twice",
        _raw("manifest.csv", lambda t: (t + "file.users,delta\n").encode()),
        "manifest.csv",
        0,
        "value",
        "file.users is given twice with different values",
    ),
    Case(
        "duplicate-column",
        _raw("users.csv", lambda t: t.replace("password\n", "role\n", 1).encode()),
        "users.csv",
        0,
        "role",
        "duplicate column(s): role",
    ),
    Case(
        "broken-quoting",
        _line_edit("users.csv", 4, "Zebediah", '"Zebediah'),
        "users.csv",
        0,
        "",
        "line 4: the CSV quoting is broken",
    ),
    Case(
        "leading-blank-line",
        _raw("classes.csv", lambda t: ("\n" + t).encode()),
        "classes.csv",
        0,
        "",
        "line 1 is blank: the header row must be the first line",
    ),
    Case(
        "v12-without-roles",
        lambda d: d.remove_file("roles.csv", from_manifest=True),
        "roles.csv",
        0,
        "",
        "OneRoster 1.2 delivery without roles.csv",
        version="1.2",
    ),
    Case(
        "v12-roles-missing-column",
        lambda d: d.drop_column("roles.csv", "orgSourcedId"),
        "roles.csv",
        0,
        "orgSourcedId",
        "missing required column(s) for OneRoster 1.2: orgSourcedId",
        version="1.2",
    ),
]

ROW_LEVEL = [
    # A rejected row protects its record under the id as written *and* trimmed: the stored
    # account 0073 is not archived because its row arrived as " 0073".
    Case(
        "padded-user-sourcedId",
        lambda d: d.set("users.csv", "0073", "sourcedId", " 0073"),
        "users.csv",
        6,
        "sourcedId",
        "sourcedId must be non-empty, without commas or surrounding spaces",
        (("users", "0073"), ("enrollments", "e6")),
    ),
    Case(
        "padded-class-sourcedId",
        lambda d: d.set("classes.csv", "c2", "sourcedId", "c2 "),
        "classes.csv",
        3,
        "sourcedId",
        "sourcedId must be non-empty, without commas or surrounding spaces",
        (("classes", "c2"), ("enrollments", "e5"), ("enrollments", "e6")),
    ),
    Case(
        "duplicate-user-sourcedId",
        lambda d: d.add_row("users.csv", **_user_row("0072", "dup.person")),
        "users.csv",
        5,
        "sourcedId",
        "duplicate sourcedId 0072; every row with it is rejected",
        (("users", "0072"), ("enrollments", "e3")),
    ),
    Case(
        "bad-user-role",
        lambda d: d.set("users.csv", "0073", "role", "principal"),
        "users.csv",
        6,
        "role",
        "expected one of: administrator, aide",
        (("users", "0073"), ("enrollments", "e6")),
    ),
    Case(
        "bad-org-type",
        lambda d: d.set("orgs.csv", "s2", "type", "campus"),
        "orgs.csv",
        4,
        "type",
        "(got campus)",
        (("locations", "s2"), ("users", "t2"), ("classes", "c2"), ("enrollments", "e6")),
    ),
    Case(
        "bad-grade-code",
        lambda d: d.set("users.csv", "0071", "grades", "13th"),
        "users.csv",
        4,
        "grades",
        "grades must be CEDS codes",
        (("users", "0071"),),
    ),
    Case(
        "bad-grade-in-list",
        lambda d: d.set("users.csv", "0072", "grades", "09,Tenth"),
        "users.csv",
        5,
        "grades",
        "(got 09,Tenth)",
        (("users", "0072"),),
    ),
    Case(
        "missing-givenName",
        lambda d: d.set("users.csv", "0072", "givenName", ""),
        "users.csv",
        5,
        "givenName",
        "required value missing in givenName",
        (("users", "0072"),),
    ),
    Case(
        "missing-username",
        lambda d: d.set("users.csv", "t2", "username", ""),
        "users.csv",
        3,
        "username",
        "required value missing in username",
        (("users", "t2"), ("enrollments", "e5")),
    ),
    Case(
        "bad-enabledUser",
        lambda d: d.set("users.csv", "t1", "enabledUser", "yes"),
        "users.csv",
        2,
        "enabledUser",
        "expected one of: true, false",
        (("users", "t1"),),
    ),
    Case(
        "bad-user-status",
        lambda d: d.set("users.csv", "0074", "status", "deleted"),
        "users.csv",
        7,
        "status",
        "expected one of: active, tobedeleted",
        (("users", "0074"),),
    ),
    Case(
        "user-unknown-org",
        lambda d: d.set("users.csv", "0073", "orgSourcedIds", "s2,s9"),
        "users.csv",
        6,
        "orgSourcedIds",
        "references unknown org s9",
        (("users", "0073"),),
    ),
    Case(
        "user-org-list-empty-item",
        lambda d: d.set("users.csv", "t1", "orgSourcedIds", "s1,"),
        "users.csv",
        2,
        "orgSourcedIds",
        "references unknown org (empty list item)",
        (("users", "t1"),),
    ),
    Case(
        "misaligned-row",
        _line_edit("users.csv", 6, "Cornelius", "Cornelius,Jr"),
        "users.csv",
        6,
        "",
        "the extra cells are not empty",
        (("users", "0073"), ("enrollments", "e6")),
    ),
    Case(
        "duplicate-username",
        lambda d: d.set("users.csv", "0072", "username", "philomena.quarrington"),
        "users.csv",
        5,
        "username",
        "username used by more than one user",
        (("users", "0072"), ("users", "t1"), ("enrollments", "e1")),
    ),
    Case(
        "formula-sourcedId",
        lambda d: d.add_row("users.csv", **_user_row('=HYPERLINK("http://x","y")', "f1")),
        "users.csv",
        10,
        "sourcedId",
        "sourcedId must be non-empty, without commas",
        (("users", '=HYPERLINK("http://x","y")'),),
    ),
    Case(
        "bad-classType",
        lambda d: d.set("classes.csv", "c1", "classType", "lecture"),
        "classes.csv",
        2,
        "classType",
        "expected one of: homeroom, scheduled",
        (("classes", "c1"), ("enrollments", "e1")),
    ),
    Case(
        "class-at-district",
        lambda d: d.set("classes.csv", "c2", "schoolSourcedId", "d1"),
        "classes.csv",
        3,
        "schoolSourcedId",
        "is an org of type district, not a school",
        (("classes", "c2"),),
    ),
    Case(
        "class-unknown-school",
        lambda d: d.set("classes.csv", "c2", "schoolSourcedId", "s9"),
        "classes.csv",
        3,
        "schoolSourcedId",
        "references unknown org s9",
        (("classes", "c2"), ("enrollments", "e7")),
    ),
    Case(
        "class-missing-title",
        lambda d: d.set("classes.csv", "c1", "title", ""),
        "classes.csv",
        2,
        "title",
        "required value missing in title",
        (("classes", "c1"),),
    ),
    Case(
        "duplicate-class-sourcedId",
        lambda d: d.add_row(
            "classes.csv", sourcedId="c1", title="Copy", classType="scheduled", schoolSourcedId="s1"
        ),
        "classes.csv",
        4,
        "sourcedId",
        "duplicate sourcedId c1",
        (("classes", "c1"), ("enrollments", "e2")),
    ),
    Case(
        "org-missing-name",
        lambda d: d.set("orgs.csv", "s2", "name", ""),
        "orgs.csv",
        4,
        "name",
        "required value missing in name",
        (("locations", "s2"), ("users", "t2"), ("classes", "c2")),
    ),
    Case(
        "enrollment-unknown-user",
        lambda d: d.set("enrollments.csv", "e3", "userSourcedId", "ghost"),
        "enrollments.csv",
        4,
        "userSourcedId",
        "references unknown user ghost",
        (("enrollments", "e3"),),
    ),
    Case(
        "enrollment-unknown-class",
        lambda d: d.set("enrollments.csv", "e6", "classSourcedId", "c9"),
        "enrollments.csv",
        7,
        "classSourcedId",
        "references unknown class c9",
        (("enrollments", "e6"),),
    ),
    Case(
        "enrollment-missing-user",
        lambda d: d.set("enrollments.csv", "e5", "userSourcedId", ""),
        "enrollments.csv",
        6,
        "userSourcedId",
        "required value missing in userSourcedId",
        (("enrollments", "e5"),),
    ),
    Case(
        "bad-enrollment-role",
        lambda d: d.set("enrollments.csv", "e2", "role", "guardian"),
        "enrollments.csv",
        3,
        "role",
        "expected one of: administrator, proctor, student, teacher",
        (("enrollments", "e2"),),
    ),
    Case(
        "bad-primary",
        lambda d: d.set("enrollments.csv", "e1", "primary", "maybe"),
        "enrollments.csv",
        2,
        "primary",
        "expected one of: true, false (or blank)",
        (("enrollments", "e1"),),
    ),
    Case(
        "blank-enrollment-sourcedId",
        lambda d: d.add_row(
            "enrollments.csv",
            sourcedId="",
            classSourcedId="c1",
            userSourcedId="0073",
            role="student",
        ),
        "enrollments.csv",
        11,
        "sourcedId",
        "sourcedId must be non-empty",
        (),
    ),
    Case(
        "delta-row-without-status",
        _delta_users_with_blank_status,
        "users.csv",
        6,
        "status",
        "status is required in a delta file",
        (("users", "0073"),),
    ),
    Case(
        "v12-bad-role",
        lambda d: d.set("roles.csv", "r-0074-2", "role", "wizard"),
        "roles.csv",
        8,
        "role",
        "(got wizard)",
        (("users", "0074"), ("enrollments", "e7")),
        version="1.2",
    ),
    Case(
        "v12-bad-roleType",
        lambda d: d.set("roles.csv", "r-sa1-2", "roleType", "main"),
        "roles.csv",
        10,
        "roleType",
        "expected one of: primary, secondary",
        (("users", "sa1"), ("enrollments", "e9")),
        version="1.2",
    ),
    Case(
        "v12-role-unknown-org",
        lambda d: d.set("roles.csv", "r-t2-1", "orgSourcedId", "s9"),
        "roles.csv",
        3,
        "orgSourcedId",
        "references unknown org s9",
        (("users", "t2"),),
        version="1.2",
    ),
    Case(
        "v12-role-unknown-user",
        lambda d: d.set("roles.csv", "r-0071-1", "userSourcedId", "ghost"),
        "roles.csv",
        4,
        "userSourcedId",
        "references unknown user ghost",
        (("users", "0071"),),
        version="1.2",
    ),
    Case(
        "v12-user-without-roles",
        lambda d: d.remove_row("roles.csv", "r-0073-1"),
        "users.csv",
        6,
        "sourcedId",
        "user has no roles.csv row",
        (("users", "0073"), ("enrollments", "e6")),
        version="1.2",
    ),
]

CORPUS = REFUSED + ROW_LEVEL


def _by_id(*ids: str) -> list[Case]:
    return [case for case in CORPUS if case.id in ids]


# -- shared baseline --------------------------------------------------------------------------------


def _malformed(case: Case, identifier: str = LEGIT_ID[1]) -> Delivery:
    delivery = baseline(case.version)
    delivery.set("users.csv", LEGIT_ID[0], "identifier", identifier)
    return case.mutate(delivery) or delivery


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Per version, a SQLite store with the baseline imported, and its snapshot."""
    out = {}
    for version in ("1.1", "1.2"):
        root = tmp_path_factory.mktemp(f"baseline-{version}")
        engine = open_store(root / "roster.sqlite3")
        directory = baseline(version).write(root / "delivery")
        register(engine, DISTRICT, directory)
        assert sync_directory(engine, DISTRICT, directory).state == "applied"
        out[version] = (root / "roster.sqlite3", sync.snapshot(engine, DISTRICT))
        engine.dispose()
    return out


def _matching(issues: list[Issue] | list[dict], case: Case) -> list:
    def get(issue, key):
        return issue[key] if isinstance(issue, dict) else getattr(issue, key)

    return [
        issue
        for issue in issues
        if get(issue, "severity") == "error"
        and (get(issue, "file"), get(issue, "line"), get(issue, "column"))
        == (case.file, case.line, case.column)
        and case.message in get(issue, "message")
    ]


def _records(snapshot: dict) -> dict[tuple[str, str], dict]:
    return {
        (entity, row["sourcedId"]): row
        for entity in ("locations", "users", "classes", "enrollments")
        for row in snapshot[entity]
    }


def _assert_roster(case: Case, before: dict, after: dict, identifier: str = LEGIT_ID[1]) -> None:
    if case.refused:
        assert after == before
        return
    old, new = _records(before), _records(after)
    for key in case.untouched:
        assert new.get(key) == old.get(key), f"{key} changed"
    # The valid part of the delivery was applied.
    assert new[("users", LEGIT_ID[0])]["identifier"] == identifier


def test_corpus_is_large_and_distinct():
    assert len(CORPUS) >= 30
    assert len({case.id for case in CORPUS}) == len(CORPUS)
    assert len(REFUSED) >= 10 and len(ROW_LEVEL) >= 20


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.id)
def test_malformed_delivery(case: Case, templates, tmp_path):
    template, before = templates[case.version]
    engine = copy_store(template, tmp_path / "roster.sqlite3")
    try:
        directory = _malformed(case).write(tmp_path / "delivery")
        outcome = sync_directory(engine, DISTRICT, directory)
        assert _matching(outcome.issues, case), [i.one_line() for i in outcome.issues]
        assert outcome.state == ("refused" if case.refused else "applied")
        _assert_roster(case, before, sync.snapshot(engine, DISTRICT))
    finally:
        engine.dispose()


# -- through the real Dagster job ---------------------------------------------------------------------

# One baseline import, then these deliveries one after the other (a Dagster run costs seconds).
E2E = {
    "1.1": [
        "missing-column-givenName",
        "bad-user-role",
        "invalid-utf8",
        "enrollment-unknown-user",
        "manifest-contradicts-users-header",
    ],
    "1.2": ["v12-bad-role"],
}


@pytest.mark.parametrize("version", sorted(E2E))
def test_malformed_deliveries_through_the_job(version: str, capti_env):
    drop = capti_env.delivery_dir("drop")
    baseline(version).write(drop)
    capti_env.register(DISTRICT, drop)
    assert capti_env.run(DISTRICT).state == "applied"
    for step, case in enumerate(_by_id(*E2E[version]), start=2):
        before = capti_env.snapshot(DISTRICT)
        identifier = f"ID-da1-delivery{step}"
        _malformed(case, identifier).write(drop)
        outcome = capti_env.run(DISTRICT)
        assert _matching(outcome.report["issues"], case), (case.id, outcome.report["issues"])
        if case.refused:
            assert (outcome.state, outcome.exit_code) == ("refused", 2), case.id
            assert case.file in outcome.report["reason"]
        else:
            assert (outcome.state, outcome.exit_code) == ("applied", 0), case.id
        _assert_roster(case, before, capti_env.snapshot(DISTRICT), identifier)


def test_report_has_no_personal_data_and_its_csv_is_spreadsheet_safe(capti_env):
    drop = capti_env.delivery_dir("drop")
    baseline().write(drop)
    capti_env.register(DISTRICT, drop)
    capti_env.run(DISTRICT)

    delivery = baseline()
    delivery.set("users.csv", "0071", "grades", "13th")  # bad values next to names and emails
    delivery.set("users.csv", "0072", "username", "philomena.quarrington")
    delivery.set("enrollments.csv", "e6", "userSourcedId", "@SUM(1)")
    delivery.add_row("users.csv", **_user_row('=HYPERLINK("http://evil.example","x")', "evil"))
    delivery.add_row("users.csv", **{**_user_row("@SUM(1)", "sum"), "enabledUser": "nope"})
    delivery.add_row("users.csv", **{**_user_row("+cmd", "plus"), "orgSourcedIds": "-1+2"})
    text = delivery.text("users.csv").split("\n")
    text[4] = text[4].replace("Zebediah", "Zebediah,Quincy")  # misaligned: names in odd columns
    delivery.raw["users.csv"] = "\n".join(text).encode()
    delivery.write(drop)
    outcome = capti_env.run(DISTRICT)
    report = outcome.report
    assert report["error_count"] >= 6

    as_json = json.dumps(report)
    as_csv = rp.to_csv(report)
    for value in PII_VALUES:
        assert value not in as_json, value
        assert value not in as_csv, value

    rows = list(csv.reader(io.StringIO(as_csv)))
    assert rows[0] == ["severity", "file", "line", "column", "sourcedId", "message"]
    for row in rows[1:]:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@")), row
    ids = {row[4] for row in rows[1:]}
    assert '\'=HYPERLINK("http://evil.example","x")' in ids
    assert "'@SUM(1)" in ids
    assert "'+cmd" in ids
