"""validate_delivery on small deliveries: CSV dialects, headers, versions, manifests, lazy row
validation, line numbers, and that no district file can make it (or resolve) raise."""

import csv
import io
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as strat

from capti_pipeline.lib import report as rp
from capti_pipeline.lib.issues import ERROR, WARNING
from capti_pipeline.lib.resolve import resolve_roster
from capti_pipeline.lib.validate import KnownRecords, ValidatedDelivery, validate_delivery
from capti_pipeline_tests.fixtures.deliveries import PII_VALUES, Delivery, baseline

_counter = itertools.count()


def run(delivery: Delivery, tmp_path: Path, known: KnownRecords | None = None) -> ValidatedDelivery:
    return validate_delivery(delivery.write(tmp_path / f"d{next(_counter)}"), known)


def errors(validated: ValidatedDelivery) -> list[tuple[str, int, str, str]]:
    return [
        (i.file, i.line, i.column, i.sourced_id) for i in validated.issues if i.severity == ERROR
    ]


def warnings(validated: ValidatedDelivery) -> list[str]:
    return [i.one_line() for i in validated.issues if i.severity == WARNING]


def users(validated: ValidatedDelivery) -> dict[str, dict[str, str]]:
    frame = validated.frames["users"]
    return {row["sourcedId"]: row for row in frame.to_dict("records")}


# -- the baseline itself --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_baseline_is_clean(tmp_path, version):
    validated = run(baseline(version), tmp_path)
    assert validated.version == version
    assert not validated.refused
    assert validated.issues == []
    assert validated.rows_read["users.csv"] == 8
    assert set(validated.modes.values()) <= {"bulk", "absent"}


# -- CSV dialects ---------------------------------------------------------------------------------


def _raw(delivery: Delivery, file: str, text: str, encoding: str = "utf-8") -> Delivery:
    out = delivery.copy()
    out.raw[file] = text.encode(encoding)
    return out


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda t: "\ufeff" + t, id="bom"),
        pytest.param(lambda t: t.replace("\n", "\r\n"), id="crlf"),
        pytest.param(lambda t: "\ufeff" + t.replace("\n", "\r\n"), id="bom-crlf"),
        pytest.param(lambda t: t.replace("\n", "\r"), id="bare-cr"),
        pytest.param(lambda t: t.rstrip("\n"), id="no-final-newline"),
    ],
)
def test_line_endings_and_bom_read_the_same_roster(tmp_path, transform):
    base = baseline()
    expected = users(run(base, tmp_path))
    changed = base.copy()
    for file in ("users.csv", "enrollments.csv", "manifest.csv"):
        changed.raw[file] = transform(base.text(file)).encode()
    validated = run(changed, tmp_path)
    assert not [i for i in validated.issues if i.severity == ERROR]
    assert users(validated) == expected
    assert len(validated.frames["enrollments"]) == 9


def test_missing_final_newline_is_a_warning(tmp_path):
    base = baseline()
    validated = run(_raw(base, "users.csv", base.text("users.csv").rstrip("\n")), tmp_path)
    assert "WARNING users.csv: no newline at end of file; accepted" in warnings(validated)
    assert len(validated.frames["users"]) == 8


def test_columns_are_mapped_by_name_not_position(tmp_path):
    base = baseline()
    expected = users(run(base, tmp_path))
    shuffled = base.copy()
    for file in shuffled.files.values():
        file.header.reverse()
    validated = run(shuffled, tmp_path)
    assert validated.issues == []
    assert users(validated) == expected


def test_quoted_comma_lists_and_leading_zero_ids_survive(tmp_path):
    validated = run(baseline(), tmp_path)
    row = users(validated)["0072"]
    assert row["grades"] == "09,10"
    assert users(validated)["0074"]["orgSourcedIds"] == "s1,s2"
    assert "0071" in users(validated)  # not 71


def test_every_cell_quoted_is_fine(tmp_path):
    base = baseline()
    out = base.copy()
    for name, file in base.files.items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        writer.writerow(file.header)
        writer.writerows([[r.get(c, "") for c in file.header] for r in file.rows])
        out.raw[name] = buffer.getvalue().encode()
    validated = run(out, tmp_path)
    assert validated.issues == []
    assert users(validated) == users(run(base, tmp_path))


def test_metadata_columns_are_ignored_quietly_and_unknown_ones_with_a_warning(tmp_path):
    delivery = baseline()
    delivery.files["orgs.csv"].header += ["metadata.address1", "metadata.city"]
    delivery.set("orgs.csv", "s1", "metadata.city", "Springfield")
    delivery.files["users.csv"].header.append("favouriteColour")
    validated = run(delivery, tmp_path)
    assert warnings(validated) == ["WARNING users.csv: unknown column(s) ignored: favouriteColour"]
    assert "metadata.city" not in validated.frames["orgs"].columns


def test_excel_style_booleans_and_case_variants_are_canonicalised(tmp_path):
    delivery = baseline()
    delivery.set("users.csv", "0071", "enabledUser", "TRUE").set(
        "users.csv", "0072", "enabledUser", "False"
    )
    delivery.set("classes.csv", "c1", "classType", "Scheduled").set(
        "users.csv", "t1", "role", "Teacher"
    )
    delivery.set("users.csv", "0073", "status", "Active").set("users.csv", "0073", "grades", "K")
    validated = run(delivery, tmp_path)
    assert validated.issues == []
    rows = users(validated)
    assert rows["0071"]["enabledUser"] == "true" and rows["0072"]["enabledUser"] == "false"
    assert rows["t1"]["role"] == "teacher"
    assert rows["0073"]["status"] == "active" and rows["0073"]["grades"] == "KG"
    assert validated.frames["classes"].set_index("sourcedId").loc["c1", "classType"] == "scheduled"


def test_header_names_in_the_wrong_case_are_accepted_with_a_warning(tmp_path):
    delivery = baseline().rename_column("users.csv", "givenName", "GivenName")
    validated = run(delivery, tmp_path)
    assert not validated.refused
    assert (
        "column name(s) in the wrong case accepted: GivenName as givenName"
        in warnings(validated)[0]
    )
    assert users(validated)["t1"]["givenName"] == "Philomena"


def test_ragged_rows_with_empty_extra_cells_are_tolerated_with_a_warning_per_line(tmp_path):
    base = baseline()
    lines = base.text("users.csv").split("\n")
    lines[3] += ","  # line 4 (0071): one extra empty cell
    lines[5] += ",,"  # line 6 (0073): two
    validated = run(_raw(base, "users.csv", "\n".join(lines)), tmp_path)
    assert warnings(validated) == [
        "WARNING users.csv line 4 [0071]: 1 extra empty cell(s) at the end of the row; ignored",
        "WARNING users.csv line 6 [0073]: 2 extra empty cell(s) at the end of the row; ignored",
    ]
    assert users(validated) == users(run(base, tmp_path))


def test_every_row_ragged_does_not_shift_columns(tmp_path):
    """pandas would take the first column as the index here; the ids must stay where they are."""
    base = baseline()
    lines = base.text("users.csv").rstrip("\n").split("\n")
    text = "\n".join([lines[0], *(line + "," for line in lines[1:])]) + "\n"
    validated = run(_raw(base, "users.csv", text), tmp_path)
    assert set(users(validated)) == set(users(run(base, tmp_path)))
    assert len([w for w in warnings(validated) if "extra empty cell" in w]) == 8


def test_a_row_with_extra_non_empty_cells_is_rejected_alone(tmp_path):
    base = baseline()
    lines = base.text("users.csv").split("\n")
    lines[4] = lines[4].replace("Araminta", "Araminta,Jr")  # line 5 (0072): unquoted comma
    validated = run(_raw(base, "users.csv", "\n".join(lines)), tmp_path)
    assert ("users.csv", 5, "", "0072") in errors(validated)
    assert "0072" not in users(validated)
    assert "0072" in validated.protected["users"]
    assert len(users(validated)) == 7


def test_short_rows_are_padded_with_a_warning(tmp_path):
    base = baseline()
    lines = base.text("users.csv").split("\n")
    lines[2] = ",".join(next(csv.reader([lines[2]]))[:10])  # line 3 (t2): stops after familyName
    validated = run(_raw(base, "users.csv", "\n".join(lines)), tmp_path)
    assert warnings(validated) == [
        "WARNING users.csv line 3 [t2]: row has 10 cells but the header has 18; the missing "
        "cells are read as empty"
    ]
    assert users(validated)["t2"]["email"] == ""


def test_odd_rows_in_a_crlf_file_keep_their_values_clean(tmp_path):
    base = baseline()
    lines = base.text("users.csv").split("\n")
    lines[2] = ",".join(next(csv.reader([lines[2]]))[:10])  # t2: short row
    lines[3] += ","  # 0071: ragged row
    validated = run(_raw(base, "users.csv", "\r\n".join(lines)), tmp_path)
    assert [w.split("]")[0] for w in warnings(validated)] == [
        "WARNING users.csv line 4 [0071",
        "WARNING users.csv line 3 [t2",
    ]
    rows = users(validated)
    assert (rows["t2"]["familyName"], rows["0071"]["grades"]) == ("Vexley", "09")


def test_values_spanning_lines_keep_line_numbers_exact(tmp_path):
    delivery = baseline().set("users.csv", "0071", "givenName", "Two\nLines")
    delivery.set("users.csv", "0073", "role", "wizard")  # data row 5, but on line 7
    validated = run(delivery, tmp_path)
    assert errors(validated) == [("users.csv", 7, "role", "0073")]
    assert users(validated)["0071"]["givenName"] == "Two\nLines"


def test_blank_lines_are_ignored_and_lines_still_count(tmp_path):
    base = baseline()
    lines = base.text("users.csv").split("\n")
    lines.insert(3, "")  # a blank line 4 pushes 0071 to line 5
    delivery = _raw(base, "users.csv", "\n".join(lines))
    delivery.raw["users.csv"] = delivery.raw["users.csv"].replace(
        b"Zebediah,Quillfeather", b",Quillfeather"
    )
    validated = run(delivery, tmp_path)
    assert "WARNING users.csv line 4: blank line ignored" in warnings(validated)
    assert errors(validated) == [("users.csv", 5, "givenName", "0071")]


# -- file-level refusals --------------------------------------------------------------------------


def _refusal(validated: ValidatedDelivery) -> list[tuple[str, str, str]]:
    assert validated.refused
    return [(i.file, i.column, i.message) for i in validated.file_errors]


def test_invalid_utf8_is_refused_naming_the_line(tmp_path):
    base = baseline()
    text = base.text("users.csv").replace("Cornelius", "Cornélius")
    [(file, _, message)] = _refusal(run(_raw(base, "users.csv", text, "latin-1"), tmp_path))
    assert file == "users.csv"
    assert message.startswith("not valid UTF-8 (byte 0xe9 on line 6)")


def test_utf16_is_refused(tmp_path):
    base = baseline()
    [(file, _, message)] = _refusal(
        run(_raw(base, "orgs.csv", base.text("orgs.csv"), "utf-16"), tmp_path)
    )
    assert (file, message) == ("orgs.csv", "the file is UTF-16 encoded; it must be saved as UTF-8")


def test_missing_columns_are_refused_naming_file_and_columns(tmp_path):
    delivery = (
        baseline().drop_column("users.csv", "familyName").drop_column("enrollments.csv", "role")
    )
    refusal = _refusal(run(delivery, tmp_path))
    assert (
        "users.csv",
        "familyName",
        "missing required column(s) for OneRoster 1.1: familyName",
    ) in refusal
    assert (
        "enrollments.csv",
        "role",
        "missing required column(s) for OneRoster 1.1: role",
    ) in refusal


def test_misspelt_column_is_named_with_a_hint(tmp_path):
    delivery = baseline().rename_column("users.csv", "familyName", "famliyName")
    [(file, column, message)] = _refusal(run(delivery, tmp_path))
    assert (file, column) == ("users.csv", "familyName")
    assert "familyName (is 'famliyName' a misspelling?)" in message


@pytest.mark.parametrize("version", ["1", "1.0"])
def test_manifest_version_1_and_1_0_are_accepted(tmp_path, version):
    delivery = baseline()
    delivery.manifest["manifest.version"] = version
    assert run(delivery, tmp_path).issues == []


def test_version_comes_from_the_users_header_when_the_manifest_is_silent(tmp_path):
    for version in ("1.1", "1.2"):
        delivery = baseline(version)
        del delivery.manifest["oneroster.version"]
        validated = run(delivery, tmp_path)
        assert validated.version == version
        assert not validated.refused


def test_manifest_contradicting_the_users_header_is_refused(tmp_path):
    delivery = baseline("1.1")
    delivery.manifest["oneroster.version"] = "1.2"
    [(file, column, message)] = _refusal(run(delivery, tmp_path))
    assert (file, column) == ("users.csv", "role")
    assert "manifest.csv says OneRoster 1.2 but the users.csv header is OneRoster 1.1" in message


def test_roles_csv_in_a_1_1_delivery_is_ignored(tmp_path):
    delivery = baseline("1.1")
    delivery.files["roles.csv"] = baseline("1.2").files["roles.csv"]
    delivery.manifest["file.roles"] = "bulk"
    validated = run(delivery, tmp_path)
    assert not validated.refused
    assert "roles" not in validated.frames
    assert any("roles.csv belongs to OneRoster 1.2" in w for w in warnings(validated))


def test_manifest_file_rows_are_case_insensitive_and_blank_modes_warn(tmp_path):
    delivery = baseline()
    delivery.manifest = {
        k.upper() if k.startswith("file.u") else k: v for k, v in delivery.manifest.items()
    }
    delivery.manifest["file.classes"] = "Bulk"
    delivery.manifest["file.courses"] = ""
    validated = run(delivery, tmp_path)
    assert not validated.refused
    assert validated.modes["users.csv"] == "bulk" and validated.modes["classes.csv"] == "bulk"
    assert (
        "WARNING manifest.csv column value: file.courses has no value; taken as absent"
        in warnings(validated)
    )


def test_a_delivery_without_a_manifest_is_read_as_bulk_with_a_warning(tmp_path):
    directory = baseline().write(tmp_path / "nomanifest")
    (directory / "manifest.csv").unlink()
    validated = validate_delivery(directory)
    assert not validated.refused
    assert validated.modes["users.csv"] == "bulk"
    assert "no manifest.csv" in warnings(validated)[0]


# -- row-level validation -------------------------------------------------------------------------


def test_lazy_validation_reports_every_bad_row_at_once(tmp_path):
    delivery = baseline()
    delivery.set("users.csv", "t2", "givenName", "")
    delivery.set("users.csv", "0071", "grades", "13th")
    delivery.set("users.csv", "0072", "role", "principal")
    validated = run(delivery, tmp_path)
    assert errors(validated) == [
        ("users.csv", 3, "givenName", "t2"),
        ("users.csv", 4, "grades", "0071"),
        ("users.csv", 5, "role", "0072"),
    ]
    messages = [i.message for i in validated.issues if i.severity == ERROR]
    assert messages[0] == "required value missing in givenName"
    assert messages[1].endswith("(got 13th)")
    assert messages[2].startswith("expected one of: administrator")
    assert set(users(validated)) == {"t1", "0073", "0074", "sa1", "da1"}
    assert {"t2", "0071", "0072"} <= validated.protected["users"]


def test_one_row_with_several_problems_reports_each(tmp_path):
    delivery = (
        baseline()
        .set("users.csv", "0073", "role", "x")
        .set("users.csv", "0073", "enabledUser", "yes")
    )
    validated = run(delivery, tmp_path)
    assert errors(validated) == [
        ("users.csv", 6, "enabledUser", "0073"),
        ("users.csv", 6, "role", "0073"),
    ]


def test_duplicate_sourced_ids_reject_every_copy(tmp_path):
    delivery = baseline()
    delivery.add_row(
        "classes.csv", sourcedId="c1", title="Copy", classType="scheduled", schoolSourcedId="s1"
    )
    validated = run(delivery, tmp_path)
    assert errors(validated) == [
        ("classes.csv", 2, "sourcedId", "c1"),
        ("classes.csv", 4, "sourcedId", "c1"),
    ]
    assert "c1" in validated.protected["classes"]
    # its enrollments are skipped (left as they are), not rejected as dangling
    skipped = [i for i in validated.issues if i.file == "enrollments.csv"]
    assert {i.sourced_id for i in skipped} == {"e1", "e2", "e3", "e4", "e8"}
    assert all(i.severity == WARNING for i in skipped)


def test_dangling_references_are_rejected_with_their_line(tmp_path):
    delivery = baseline()
    delivery.set("enrollments.csv", "e3", "userSourcedId", "ghost")
    delivery.set("enrollments.csv", "e6", "classSourcedId", "c9")
    delivery.set("users.csv", "t2", "orgSourcedIds", "s2,s9")
    validated = run(delivery, tmp_path)
    by_key = {
        (i.file, i.line, i.column): i.message for i in validated.issues if i.severity == ERROR
    }
    assert by_key == {
        ("users.csv", 3, "orgSourcedIds"): "references unknown org s9",
        ("enrollments.csv", 4, "userSourcedId"): "references unknown user ghost",
        ("enrollments.csv", 7, "classSourcedId"): "references unknown class c9",
    }


def test_delta_references_may_point_at_stored_records(tmp_path):
    delivery = baseline()
    delivery.files = {"enrollments.csv": delivery.files["enrollments.csv"]}
    delivery.files["enrollments.csv"].rows = [
        {
            "sourcedId": "e10",
            "status": "active",
            "classSourcedId": "c1",
            "userSourcedId": "0073",
            "role": "student",
        }
    ]
    delivery.manifest = {
        "manifest.version": "1.0",
        "oneroster.version": "1.1",
        "file.orgs": "absent",
        "file.users": "absent",
        "file.classes": "absent",
        "file.enrollments": "delta",
    }
    known = KnownRecords(org_types={"s1": "school"}, users={"0073"}, classes={"c1"})
    validated = run(delivery, tmp_path, known)
    assert validated.issues == []
    assert run(delivery, tmp_path).row_errors()[0].message == "references unknown class c1"


def test_tobedeleted_rows_only_need_their_sourced_id(tmp_path):
    delivery = baseline()
    delivery.set("users.csv", "0073", "status", "tobedeleted").set(
        "users.csv", "0073", "givenName", ""
    )
    delivery.set("users.csv", "0073", "grades", "??").set(
        "users.csv", "0073", "orgSourcedIds", "gone"
    )
    delivery.remove_row("enrollments.csv", "e6")
    validated = run(delivery, tmp_path)
    assert validated.issues == []
    assert users(validated)["0073"]["status"] == "tobedeleted"


def test_ext_vocabulary_is_accepted_in_1_2_only(tmp_path):
    v12 = baseline("1.2")
    v12.add_row("orgs.csv", sourcedId="x1", name="Regional office", type="ext:region")
    v12.set("classes.csv", "c2", "classType", "ext:lab")
    assert run(v12, tmp_path).issues == []
    v11 = baseline("1.1").set("classes.csv", "c2", "classType", "ext:lab")
    assert errors(run(v11, tmp_path)) == [("classes.csv", 3, "classType", "c2")]


def test_a_rejected_1_2_roles_row_leaves_its_user_untouched(tmp_path):
    delivery = baseline("1.2").set("roles.csv", "r-sa1-2", "roleType", "main")
    validated = run(delivery, tmp_path)
    assert errors(validated) == [("roles.csv", 10, "roleType", "r-sa1-2")]
    assert "sa1" not in users(validated)
    assert "sa1" in validated.protected["users"]
    assert {"e8", "e9"} <= validated.protected["enrollments"]


# -- the report carries no personal data -----------------------------------------------------------


def test_issues_never_carry_names_emails_or_passwords(tmp_path):
    base = baseline()
    delivery = base.copy()
    for sid in ("t1", "0071", "0072", "0073"):
        delivery.set("users.csv", sid, "enabledUser", "maybe")
    delivery.set("users.csv", "t2", "email", "not-an-email,with,commas")
    lines = delivery.text("users.csv").split("\n")
    lines[7] = lines[7].replace("Ignatius", "Ignatius,Jr")  # misaligned row: names shift columns
    delivery.raw["users.csv"] = "\n".join(lines).encode()
    validated = run(delivery, tmp_path)
    assert len(validated.row_errors()) >= 5
    report = rp.build_report(district_id="d", run_id="r", state="applied", issues=validated.issues)
    dumped = repr(report) + rp.to_csv(report) + rp.to_markdown(report)
    leaked = [value for value in PII_VALUES if value in dumped]
    assert leaked == []


# -- never a traceback ------------------------------------------------------------------------------


_NOISE = [
    "",
    ",",
    '"',
    "\n",
    "\r\n",
    '""',
    ",,",
    "\ufeff",
    "é",
    "\x00",
    "TRUE",
    "tobedeleted",
    "s9",
]


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    version=strat.sampled_from(["1.1", "1.2"]),
    file=strat.sampled_from(
        ["users.csv", "orgs.csv", "enrollments.csv", "classes.csv", "roles.csv", "manifest.csv"]
    ),
    edits=strat.lists(
        strat.tuples(
            strat.integers(min_value=0, max_value=5000),
            strat.integers(0, 6),
            strat.sampled_from(_NOISE),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_no_mangled_file_makes_validation_or_resolution_raise(tmp_path, version, file, edits):
    delivery = baseline(version)
    if file not in delivery.files and file != "manifest.csv":
        file = "users.csv"
    text = delivery.text(file)
    for position, cut, noise in edits:
        at = position % (len(text) + 1)
        text = text[:at] + noise + text[at + cut :]
    delivery.raw[file] = text.encode("utf-8", errors="surrogatepass")
    validated = run(delivery, tmp_path)
    if not validated.refused:
        resolve_roster(validated)
    for issue in validated.issues:
        assert issue.file and issue.message


def test_vectorised_sourced_id_rule_matches_the_python_rule():
    """The Arrow (RE2) check of sourcedIds agrees with the Python pattern on every character."""
    import re

    import pandas as pd

    from capti_pipeline.lib.schemas import _ID_PATTERN_RE2, ID_PATTERN, _matches

    values = [v for c in range(0x3100) for v in (f"a{chr(c)}", f"{chr(c)}a", f"a{chr(c)}b")]
    values = [v for v in values if "\n" not in v]  # Python's $ also matches before a final \n
    fast = _matches(pd.Series(values, dtype="str"), _ID_PATTERN_RE2).tolist()
    assert fast == [bool(re.match(ID_PATTERN, v)) for v in values]
