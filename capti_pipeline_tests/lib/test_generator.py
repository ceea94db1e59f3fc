"""Tests for the synthetic OneRoster 1.1 district generator (fast: small districts only)."""

import csv
import io
import math
import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from capti_pipeline.lib.generator import (
    ONEROSTER_11_HEADERS,
    DistrictSpec,
    GeneratedDistrict,
    add_back,
    change_fraction,
    generate_district,
    main,
    move_students,
    remove_students,
    rename_users,
    write_delivery,
)

# Written out independently of the module (OneRoster 1.1 CSV tables, spec order).
EXPECTED_HEADERS = {
    "orgs": "sourcedId,status,dateLastModified,name,type,identifier,parentSourcedId",
    "academicSessions": (
        "sourcedId,status,dateLastModified,title,type,startDate,endDate,parentSourcedId,schoolYear"
    ),
    "courses": (
        "sourcedId,status,dateLastModified,schoolYearSourcedId,title,courseCode,grades,"
        "orgSourcedId,subjects,subjectCodes"
    ),
    "classes": (
        "sourcedId,status,dateLastModified,title,grades,courseSourcedId,classCode,classType,"
        "location,schoolSourcedId,termSourcedIds,subjects,subjectCodes,periods"
    ),
    "users": (
        "sourcedId,status,dateLastModified,enabledUser,orgSourcedIds,role,username,userIds,"
        "givenName,familyName,middleName,identifier,email,sms,phone,agentSourcedIds,grades,password"
    ),
    "enrollments": (
        "sourcedId,status,dateLastModified,classSourcedId,schoolSourcedId,userSourcedId,role,"
        "primary,beginDate,endDate"
    ),
    "demographics": (
        "sourcedId,status,dateLastModified,birthDate,sex,americanIndianOrAlaskaNative,asian,"
        "blackOrAfricanAmerican,nativeHawaiianOrOtherPacificIslander,white,"
        "demographicRaceTwoOrMoreRaces,hispanicOrLatinoEthnicity,countryOfBirthCode,"
        "stateOfBirthAbbreviation,cityOfBirth,publicSchoolResidenceStatus"
    ),
}
ALL_11_FILES = {
    "academicSessions",
    "categories",
    "classes",
    "classResources",
    "courses",
    "courseResources",
    "demographics",
    "enrollments",
    "lineItems",
    "orgs",
    "resources",
    "results",
    "users",
}
CEDS = {"IT", "PR", "PK", "TK", "KG", *(f"{g:02d}" for g in range(1, 14)), "PS", "UG", "Other"}
# 8 schools -> elementary / middle / high levels, several schools per level
SPEC = DistrictSpec(district_id="gen-test", students=2400, students_per_school=300, seed=11)


@pytest.fixture(scope="module")
def district() -> GeneratedDistrict:
    return generate_district(SPEC)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")


def _snapshot(d: GeneratedDistrict) -> dict[str, pd.DataFrame]:
    return {k: v.copy(deep=True) for k, v in d.frames.items()}


def _assert_unchanged(d: GeneratedDistrict, snap: dict[str, pd.DataFrame]) -> None:
    assert d.frames.keys() == snap.keys()
    for k, v in snap.items():
        pd.testing.assert_frame_equal(d.frames[k], v)


def _school_of_class(d: GeneratedDistrict) -> dict[str, str]:
    c = d.frames["classes"]
    return dict(zip(c["sourcedId"], c["schoolSourcedId"], strict=True))


def _students_at_own_school(d: GeneratedDistrict) -> None:
    users = d.frames["users"]
    students = users[users["role"] == "student"]
    enr = d.frames["enrollments"]
    se = enr[enr["role"] == "student"].merge(
        students[["sourcedId", "orgSourcedIds"]], left_on="userSourcedId", right_on="sourcedId"
    )
    assert len(se) == (enr["role"] == "student").sum()
    class_school = se["classSourcedId"].map(_school_of_class(d))
    assert (class_school == se["orgSourcedIds"]).all()
    assert (se["schoolSourcedId"] == se["orgSourcedIds"]).all()


# ---- shape and content ------------------------------------------------------------------------


def test_frames_have_exact_11_headers_and_str_columns(district: GeneratedDistrict) -> None:
    assert set(district.frames) == set(EXPECTED_HEADERS)
    for kind, header in EXPECTED_HEADERS.items():
        frame = district.frames[kind]
        assert ",".join(frame.columns) == header, kind
        assert tuple(frame.columns) == ONEROSTER_11_HEADERS[kind]
        assert all(str(dt) == "str" for dt in frame.dtypes), kind
        assert len(frame) > 0, kind
        assert not frame.isna().any().any(), kind
        # bulk delivery: status and dateLastModified present and empty
        assert (frame["status"] == "").all() and (frame["dateLastModified"] == "").all()


def test_sourced_ids_unique_per_file(district: GeneratedDistrict) -> None:
    for kind, frame in district.frames.items():
        assert frame["sourcedId"].is_unique, kind
    users = district.frames["users"]
    assert users["username"].is_unique
    assert users.loc[users["email"] != "", "email"].is_unique


def test_orgs_and_sessions(district: GeneratedDistrict) -> None:
    orgs = district.frames["orgs"]
    assert (orgs["type"] == "district").sum() == 1
    district_id = orgs.loc[orgs["type"] == "district", "sourcedId"].item()
    schools = orgs[orgs["type"] == "school"]
    assert len(schools) == math.ceil(SPEC.students / SPEC.students_per_school)
    assert (schools["parentSourcedId"] == district_id).all()
    dept = orgs[orgs["type"] == "department"]
    assert len(dept) == 1 and dept["parentSourcedId"].item() == district_id

    sessions = district.frames["academicSessions"]
    year = sessions[sessions["type"] == "schoolYear"]
    assert len(year) == 1
    terms = sessions[sessions["type"] != "schoolYear"]
    assert len(terms) == 2 and (terms["parentSourcedId"] == year["sourcedId"].item()).all()
    assert (sessions["schoolYear"] == year["endDate"].item()[:4]).all()
    assert (sessions["startDate"] < sessions["endDate"]).all()


def test_courses_and_classes_reference_what_exists(district: GeneratedDistrict) -> None:
    orgs, courses, classes = (district.frames[k] for k in ("orgs", "courses", "classes"))
    district_id = orgs.loc[orgs["type"] == "district", "sourcedId"].item()
    school_ids = set(orgs.loc[orgs["type"] == "school", "sourcedId"])
    session_ids = set(district.frames["academicSessions"]["sourcedId"])
    assert (courses["orgSourcedId"] == district_id).all()
    assert courses["schoolYearSourcedId"].isin(session_ids).all()
    assert classes["courseSourcedId"].isin(set(courses["sourcedId"])).all()
    assert classes["schoolSourcedId"].isin(school_ids).all()
    assert set(classes["classType"]) == {"homeroom", "scheduled"}
    terms = classes["termSourcedIds"].str.split(",")
    assert terms.map(lambda t: set(t) <= session_ids and len(t) >= 1).all()
    assert (terms.str.len() == 2).any()  # some full-year classes list two terms
    assert classes["grades"].isin(CEDS).all()
    assert courses["grades"].isin(CEDS).all()


def test_users_content(district: GeneratedDistrict) -> None:
    users = district.frames["users"]
    orgs = district.frames["orgs"]
    district_id = orgs.loc[orgs["type"] == "district", "sourcedId"].item()
    school_ids = list(orgs.loc[orgs["type"] == "school", "sourcedId"])
    roles = users["role"].value_counts()
    assert roles["student"] == SPEC.students
    assert set(roles.index) == {"student", "teacher", "administrator"}
    assert roles["teacher"] >= len(school_ids)
    assert abs(roles["teacher"] - SPEC.students / 20) <= len(school_ids)
    assert set(users["enabledUser"]) == {"true", "false"}
    assert 0.002 < (users["enabledUser"] == "false").mean() < 0.03

    org_lists = users["orgSourcedIds"].str.split(",")
    known_orgs = set(orgs["sourcedId"])
    assert org_lists.map(lambda o: set(o) <= known_orgs).all()

    teachers = users[users["role"] == "teacher"]
    multi = teachers[teachers["orgSourcedIds"].str.contains(",")]
    assert len(multi) == 1
    assert set(multi["orgSourcedIds"].item().split(",")) <= set(school_ids)

    admins = users[users["role"] == "administrator"]
    assert (admins["orgSourcedIds"] == district_id).sum() == 2
    both = admins[admins["orgSourcedIds"].str.contains(",")]
    assert len(both) == 1
    mixed = both["orgSourcedIds"].item().split(",")
    assert district_id in mixed and len(set(mixed) & set(school_ids)) == 1
    for school in school_ids:
        assert (admins["orgSourcedIds"] == school).sum() == 1

    students = users[users["role"] == "student"]
    assert students["grades"].isin(CEDS).all()
    assert students["grades"].str.fullmatch(r"PK|KG|\d\d").all()
    assert (students["orgSourcedIds"].isin(school_ids)).all()
    assert 0.02 < (students["password"] != "").mean() < 0.09
    assert (users.loc[users["role"] != "student", "password"] == "").all()
    # opaque ids in several formats, leading zeros kept as text
    assert students["identifier"].str.fullmatch(r"\d{8}").all()
    assert students["identifier"].str.startswith("0").any()
    guid = r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}"
    assert users["sourcedId"].str.fullmatch(guid).any()
    assert users["sourcedId"].str.fullmatch(r"0\d+").any()
    # UTF-8 names and apostrophes
    names = pd.concat([users["givenName"], users["familyName"]])
    assert names.map(lambda s: not s.isascii()).any()
    assert names.str.contains("'").any()
    assert (users["givenName"] != "").all() and (users["familyName"] != "").all()
    assert (users["username"] != "").all()


def test_enrollments_reference_users_and_classes(district: GeneratedDistrict) -> None:
    users = district.frames["users"].set_index("sourcedId")
    enr = district.frames["enrollments"]
    classes = district.frames["classes"]
    assert enr["userSourcedId"].isin(users.index).all()
    assert enr["classSourcedId"].isin(set(classes["sourcedId"])).all()
    assert (enr["classSourcedId"].map(_school_of_class(district)) == enr["schoolSourcedId"]).all()
    assert set(enr["role"]) == {"student", "teacher"}
    assert (enr["beginDate"] < enr["endDate"]).all()
    # role in the enrollment matches the user's role
    assert (enr["role"] == enr["userSourcedId"].map(users["role"])).all()

    students = enr[enr["role"] == "student"]
    assert (students["primary"] == "false").all()
    per_student = students.groupby("userSourcedId").size()
    assert len(per_student) == SPEC.students
    assert (per_student == SPEC.enrollments_per_student).all()
    assert not students.duplicated(["userSourcedId", "classSourcedId"]).any()
    class_size = students.groupby("classSourcedId").size()
    assert 0.5 * SPEC.students_per_class <= class_size.mean() <= 1.2 * SPEC.students_per_class

    teachers = enr[enr["role"] == "teacher"]
    primary = teachers[teachers["primary"] == "true"]
    assert primary["classSourcedId"].is_unique
    assert set(primary["classSourcedId"]) == set(classes["sourcedId"])
    teacher_orgs = teachers["userSourcedId"].map(users["orgSourcedIds"]).str.split(",")
    assert all(s in o for s, o in zip(teachers["schoolSourcedId"], teacher_orgs, strict=True))
    # the multi-school teacher really teaches at both schools
    multi = users[(users["role"] == "teacher") & users["orgSourcedIds"].str.contains(",")]
    taught = set(teachers.loc[teachers["userSourcedId"] == multi.index[0], "schoolSourcedId"])
    assert taught == set(multi["orgSourcedIds"].item().split(","))


def test_students_enrolled_only_at_their_school(district: GeneratedDistrict) -> None:
    _students_at_own_school(district)
    # and in classes of their own grade
    users = district.frames["users"].set_index("sourcedId")
    grades = dict(
        zip(
            district.frames["classes"]["sourcedId"],
            district.frames["classes"]["grades"],
            strict=True,
        )
    )
    enr = district.frames["enrollments"]
    se = enr[enr["role"] == "student"]
    assert (se["classSourcedId"].map(grades) == se["userSourcedId"].map(users["grades"])).all()


def test_demographics(district: GeneratedDistrict) -> None:
    demo = district.frames["demographics"]
    users = district.frames["users"]
    assert set(demo["sourcedId"]) == set(users.loc[users["role"] == "student", "sourcedId"])
    assert demo["birthDate"].str.fullmatch(r"\d{4}-\d\d-\d\d").all()
    assert set(demo["sex"]) == {"male", "female"}
    for col in EXPECTED_HEADERS["demographics"].split(",")[5:12]:
        assert demo[col].isin({"true", "false"}).all(), col


def test_single_school_and_higher_ed_variants() -> None:
    one = generate_district(DistrictSpec(district_id="tiny", students=40))
    orgs = one.frames["orgs"]
    assert (orgs["type"] == "school").sum() == 1
    assert not one.frames["users"]["orgSourcedIds"].str.contains("sch-0002").any()
    _students_at_own_school(one)

    he = generate_district(DistrictSpec(district_id="uni", students=600, higher_ed=True))
    students = he.frames["users"].query("role == 'student'")
    assert (students["grades"] == "PS").all()
    assert (he.frames["classes"]["classType"] == "scheduled").all()
    _students_at_own_school(he)


def test_spec_is_deterministic_and_seed_sensitive(tmp_path: Path) -> None:
    spec = DistrictSpec(district_id="det", students=800, students_per_school=200, seed=3)
    a = write_delivery(generate_district(spec), tmp_path / "a")
    b = write_delivery(generate_district(spec), tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    za = write_delivery(generate_district(spec), tmp_path / "a.zip", as_zip=True)
    zb = write_delivery(generate_district(spec), tmp_path / "b.zip", as_zip=True)
    assert za.read_bytes() == zb.read_bytes()
    other = generate_district(DistrictSpec(district_id="det", students=800, seed=4))
    assert not other.frames["users"]["sourcedId"].equals(
        generate_district(spec).frames["users"]["sourcedId"]
    )


# ---- writing ----------------------------------------------------------------------------------


def test_delivery_round_trips_with_pandas(district: GeneratedDistrict, tmp_path: Path) -> None:
    out = write_delivery(district, tmp_path / "out")
    assert out == tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert files == {"manifest.csv", *(f"{k}.csv" for k in EXPECTED_HEADERS)}
    for kind, frame in district.frames.items():
        raw = (out / f"{kind}.csv").read_bytes()
        assert raw.split(b"\n", 1)[0].decode() == EXPECTED_HEADERS[kind]
        assert raw.endswith(b"\n") and b"\r" not in raw and not raw.startswith(b"\xef\xbb\xbf")
        back = _read(out / f"{kind}.csv")
        pd.testing.assert_frame_equal(back, frame, check_dtype=False)
        assert all(str(dt) == "str" for dt in back.dtypes)
    users = (out / "users.csv").read_text(encoding="utf-8")
    assert re.search(r',"[^",]+,[^",]+",(teacher|administrator),', users)  # quoted org list


def test_manifest(district: GeneratedDistrict, tmp_path: Path) -> None:
    out = write_delivery(district, tmp_path / "m")
    rows = list(csv.reader(io.StringIO((out / "manifest.csv").read_text())))
    assert rows[0] == ["propertyName", "value"]
    props = dict(rows[1:])
    assert len(props) == len(rows) - 1
    assert props["manifest.version"] == "1.0"
    assert props["oneroster.version"] == "1.1"
    assert props["source.systemName"] == "ClassLink"
    assert {k[5:] for k in props if k.startswith("file.")} == ALL_11_FILES
    for name in ALL_11_FILES:
        mode = props[f"file.{name}"]
        assert mode == ("bulk" if name in EXPECTED_HEADERS else "absent")
        assert (out / f"{name}.csv").exists() == (mode == "bulk")

    # demographics switched off: declared absent and the stale file removed
    frames = {k: v for k, v in district.frames.items() if k != "demographics"}
    write_delivery(GeneratedDistrict(district.spec, frames), out)
    props = dict(list(csv.reader(io.StringIO((out / "manifest.csv").read_text())))[1:])
    assert props["file.demographics"] == "absent"
    assert not (out / "demographics.csv").exists()


def test_quoting_of_awkward_values_round_trips(district: GeneratedDistrict, tmp_path: Path) -> None:
    users = district.frames["users"].copy()
    awkward = ["Smith, Jr.", 'Ann "Annie"', '"', ",", 'Zoë "Z", Nguyễn', "O'Brien", " padded "]
    users.loc[: len(awkward) - 1, "middleName"] = awkward
    frames = {**district.frames, "users": users}
    out = write_delivery(GeneratedDistrict(district.spec, frames), tmp_path / "q")
    text = (out / "users.csv").read_text(encoding="utf-8")
    assert '"Smith, Jr."' in text and '"Ann ""Annie"""' in text and ',"""",' in text
    assert ",O'Brien," in text  # no needless quoting
    back = _read(out / "users.csv")
    pd.testing.assert_frame_equal(back, users, check_dtype=False)
    with open(out / "users.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert all(len(r) == 18 for r in rows)


def test_bom_and_crlf(district: GeneratedDistrict, tmp_path: Path) -> None:
    out = write_delivery(district, tmp_path / "bc", bom=True, crlf=True)
    for path in out.iterdir():
        raw = path.read_bytes()
        assert raw.startswith(b"\xef\xbb\xbf") and raw.count(b"\xef\xbb\xbf") == 1, path.name
        assert raw.endswith(b"\r\n")
        assert raw.count(b"\n") == raw.count(b"\r\n"), path.name
    for kind, frame in district.frames.items():
        pd.testing.assert_frame_equal(_read(out / f"{kind}.csv"), frame, check_dtype=False)
    assert _read(out / "orgs.csv").columns[0] == "sourcedId"  # BOM not glued to the header


def test_zip_delivery(district: GeneratedDistrict, tmp_path: Path) -> None:
    path = write_delivery(district, tmp_path / "z", as_zip=True)
    assert path == tmp_path / "z" / "gen-test.zip"
    loose = write_delivery(district, tmp_path / "loose")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert sorted(names) == sorted(p.name for p in loose.iterdir())
        assert all("/" not in n for n in names)  # files at the root
        assert names[0] == "manifest.csv"
        for name in names:
            assert zf.read(name) == (loose / name).read_bytes(), name
    explicit = write_delivery(district, tmp_path / "named.zip", as_zip=True, bom=True)
    assert explicit == tmp_path / "named.zip" and zipfile.is_zipfile(explicit)
    with zipfile.ZipFile(explicit) as zf:
        assert zf.read("users.csv").startswith(b"\xef\xbb\xbf")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--students", "120", "--out", str(out), "--district-id", "cli-d", "--seed", "5"]
    assert main([*argv, "--crlf"]) == 0
    assert (out / "manifest.csv").read_bytes().endswith(b"\r\n")
    users = _read(out / "users.csv")
    assert (users["role"] == "student").sum() == 120
    assert "cli-d" in _read(out / "orgs.csv")["sourcedId"].iloc[0]
    assert main([*argv[:2], "--out", str(tmp_path / "c.zip"), "--zip"]) == 0
    assert zipfile.is_zipfile(tmp_path / "c.zip")
    assert str(out) in capsys.readouterr().out


# ---- nightly evolution ------------------------------------------------------------------------


def test_remove_students(district: GeneratedDistrict) -> None:
    snap = _snapshot(district)
    after, removed = remove_students(district, 0.05, seed=1)
    _assert_unchanged(district, snap)
    assert len(removed) == round(0.05 * SPEC.students) and len(set(removed)) == len(removed)
    users = district.frames["users"]
    assert set(users.loc[users["sourcedId"].isin(removed), "role"]) == {"student"}
    assert not after.frames["users"]["sourcedId"].isin(removed).any()
    assert not after.frames["enrollments"]["userSourcedId"].isin(removed).any()
    assert not after.frames["demographics"]["sourcedId"].isin(removed).any()
    assert len(after.frames["users"]) == len(users) - len(removed)
    kept = district.frames["enrollments"]
    kept = kept[~kept["userSourcedId"].isin(removed)].reset_index(drop=True)
    pd.testing.assert_frame_equal(after.frames["enrollments"], kept)
    for k in ("orgs", "classes", "courses", "academicSessions"):
        pd.testing.assert_frame_equal(after.frames[k], district.frames[k])
    assert remove_students(district, 0.05, seed=1)[1] == removed
    assert remove_students(district, 0.05, seed=2)[1] != removed


def test_move_students(district: GeneratedDistrict) -> None:
    snap = _snapshot(district)
    after, moved = move_students(district, 0.05, seed=2)
    _assert_unchanged(district, snap)
    assert len(moved) == round(0.05 * SPEC.students)
    before_u = district.frames["users"].set_index("sourcedId")
    after_u = after.frames["users"].set_index("sourcedId")
    assert (after_u.loc[moved, "orgSourcedIds"] != before_u.loc[moved, "orgSourcedIds"]).all()
    others = before_u.index.difference(moved)
    pd.testing.assert_frame_equal(after_u.loc[others], before_u.loc[others])
    pd.testing.assert_frame_equal(
        after_u.drop(columns="orgSourcedIds"), before_u.drop(columns="orgSourcedIds")
    )
    _students_at_own_school(after)

    enr_b, enr_a = district.frames["enrollments"], after.frames["enrollments"]
    mine_b = enr_b[enr_b["userSourcedId"].isin(moved)]
    mine_a = enr_a[enr_a["userSourcedId"].isin(moved)]
    assert len(mine_a) == len(mine_b)
    pairs_b = set(zip(mine_b["userSourcedId"], mine_b["classSourcedId"], strict=True))
    pairs_a = set(zip(mine_a["userSourcedId"], mine_a["classSourcedId"], strict=True))
    assert not pairs_a & pairs_b  # every moved student has only new classes
    assert (
        mine_a["schoolSourcedId"] == mine_a["userSourcedId"].map(after_u["orgSourcedIds"])
    ).all()
    assert enr_a["sourcedId"].is_unique
    assert enr_a["classSourcedId"].isin(set(after.frames["classes"]["sourcedId"])).all()
    # everyone else's enrollments are untouched
    rest_b = enr_b[~enr_b["userSourcedId"].isin(moved)].reset_index(drop=True)
    rest_a = enr_a[~enr_a["userSourcedId"].isin(moved)].reset_index(drop=True)
    pd.testing.assert_frame_equal(rest_a, rest_b)


def test_move_students_needs_two_schools() -> None:
    one = generate_district(DistrictSpec(district_id="solo", students=50))
    after, moved = move_students(one, 0.5, seed=1)
    assert moved == []
    for k, v in one.frames.items():
        pd.testing.assert_frame_equal(after.frames[k], v)


def test_rename_users(district: GeneratedDistrict) -> None:
    snap = _snapshot(district)
    after, renamed = rename_users(district, 0.1, seed=3, role="teacher")
    _assert_unchanged(district, snap)
    before_u = district.frames["users"].set_index("sourcedId")
    after_u = after.frames["users"].set_index("sourcedId")
    assert renamed and set(before_u.loc[renamed, "role"]) == {"teacher"}
    changed = (after_u != before_u).any()
    assert set(changed[changed].index) == {"familyName", "email"}
    assert (after_u.loc[renamed, "familyName"] != before_u.loc[renamed, "familyName"]).all()
    for sid in renamed:
        old_email, new_email = before_u.at[sid, "email"], after_u.at[sid, "email"]
        assert new_email != old_email
        assert new_email.split("@")[1] == old_email.split("@")[1]
        assert after_u.at[sid, "username"] == before_u.at[sid, "username"]
    assert after_u["email"][after_u["email"] != ""].is_unique
    for k in ("enrollments", "demographics", "classes"):
        pd.testing.assert_frame_equal(after.frames[k], district.frames[k])
    everyone = rename_users(district, 0.01, seed=3)[1]
    assert len(everyone) == round(0.01 * len(before_u))


def test_add_back_restores_identical_rows(district: GeneratedDistrict) -> None:
    removed_d, removed = remove_students(district, 0.05, seed=4)
    moved_d, moved = move_students(removed_d, 0.05, seed=5)
    renamed_d, renamed = rename_users(moved_d, 0.05, seed=6)
    snap = _snapshot(renamed_d)
    ids = removed + moved + renamed
    restored = add_back(renamed_d, district, ids)
    _assert_unchanged(renamed_d, snap)
    for kind, key in (
        ("users", "sourcedId"),
        ("enrollments", "sourcedId"),
        ("demographics", "sourcedId"),
    ):
        a = restored.frames[kind].sort_values(key).reset_index(drop=True)
        b = district.frames[kind].sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, obj=kind)


def test_change_fraction(district: GeneratedDistrict) -> None:
    snap = _snapshot(district)
    after = change_fraction(district, 0.03, seed=9)
    _assert_unchanged(district, snap)
    before_u = district.frames["users"].set_index("sourcedId")
    after_u = after.frames["users"].set_index("sourcedId")
    removed = before_u.index.difference(after_u.index)
    assert len(removed) == round(0.01 * SPEC.students)
    common = after_u.index
    moved = (after_u["orgSourcedIds"] != before_u.loc[common, "orgSourcedIds"]).sum()
    renamed = (after_u["familyName"] != before_u.loc[common, "familyName"]).sum()
    assert moved == round(0.01 * (SPEC.students - len(removed)))
    assert renamed == round(0.01 * len(after_u))
    _students_at_own_school(after)
    assert change_fraction(district, 0.03, seed=9).frames["users"].equals(after.frames["users"])


def test_fraction_validation(district: GeneratedDistrict) -> None:
    with pytest.raises(ValueError):
        remove_students(district, 1.5, seed=1)
    same, none = remove_students(district, 0.0, seed=1)
    assert none == [] and len(same.frames["users"]) == len(district.frames["users"])
