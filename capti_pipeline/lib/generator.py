"""Synthetic OneRoster 1.1 district generator (ClassLink-style bulk delivery).

Builds a realistic district (orgs, academic sessions, courses, classes, users, enrollments,
demographics) as pandas frames whose columns are all ``str`` and carry the exact OneRoster 1.1
headers in spec order, and writes it as a delivery (``manifest.csv`` + CSV files, loose or zipped).

Everything is vectorised with numpy / pyarrow compute: there is no per-row Python loop over users,
classes or enrollments, so one million students (about six million enrollments) generate and write
in well under a minute on a small machine.  Output is deterministic: the same :class:`DistrictSpec`
always gives byte-identical files.

Nightly evolution helpers (:func:`remove_students`, :func:`move_students`, :func:`rename_users`,
:func:`add_back`, :func:`change_fraction`) derive the next night's delivery from a previous one;
they never mutate their input.

Command line::

    python -m capti_pipeline.lib.generator --students 100000 --out /tmp/delivery [--zip]
"""

import argparse
import math
import sys
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from capti_pipeline.lib.oneroster_format import HEADERS

__all__ = [
    "MANIFEST_FILES_11",
    "ONEROSTER_11_HEADERS",
    "SCHOOL_YEAR",
    "DistrictSpec",
    "GeneratedDistrict",
    "add_back",
    "change_fraction",
    "generate_district",
    "main",
    "move_students",
    "remove_students",
    "rename_users",
    "write_delivery",
]

# --------------------------------------------------------------------------------------------
# OneRoster 1.1 constants
# --------------------------------------------------------------------------------------------

_COMMON = ("sourcedId", "status", "dateLastModified")

#: Exact OneRoster 1.1 CSV headers, in mandatory order, for the rostering files we generate
#: (the rostering ones are the importer's own definition; demographics is only generated).
ONEROSTER_11_HEADERS: dict[str, tuple[str, ...]] = {
    **{
        kind: HEADERS[("1.1", f"{kind}.csv")]
        for kind in ("orgs", "academicSessions", "courses", "classes", "users", "enrollments")
    },
    "demographics": (
        *_COMMON,
        "birthDate",
        "sex",
        "americanIndianOrAlaskaNative",
        "asian",
        "blackOrAfricanAmerican",
        "nativeHawaiianOrOtherPacificIslander",
        "white",
        "demographicRaceTwoOrMoreRaces",
        "hispanicOrLatinoEthnicity",
        "countryOfBirthCode",
        "stateOfBirthAbbreviation",
        "cityOfBirth",
        "publicSchoolResidenceStatus",
    ),
}

#: Every ``file.*`` entry of a 1.1 manifest, in the order we write them.
MANIFEST_FILES_11: tuple[str, ...] = (
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
)

#: The school year (year in which it ends) of every generated district; fixed for determinism.
SCHOOL_YEAR = 2027

_L = pa.large_string()
_EMPTY = pa.scalar("", _L)

# Grade slots: PK, KG, 01..12, PS (postsecondary, used for higher_ed districts).
_GRADE_CODES = ("PK", "KG", *(f"{g:02d}" for g in range(1, 13)), "PS")
_GRADE_LABELS = (
    "Pre-K",
    "Kindergarten",
    *(f"Grade {g}" for g in range(1, 13)),
    "",
)
_NG = len(_GRADE_CODES)
_PS = _NG - 1
# Age on 1 September of the start of the school year.
_GRADE_AGE = np.array([4, 5, *range(6, 18), 18], dtype=np.int64)

# level -> (grade slots, school-name suffix)
_LEVELS: tuple[tuple[tuple[int, ...], str], ...] = (
    (tuple(range(0, 7)), "Elementary School"),  # PK..05
    (tuple(range(7, 10)), "Middle School"),  # 06..08
    (tuple(range(10, 14)), "High School"),  # 09..12
    (tuple(range(0, 14)), "K-12 Academy"),  # small districts: every school serves all grades
    ((_PS,), "College"),  # higher_ed
)

# (subject, course-code stem, SCED-like subject code)
_ACADEMIC = (
    ("Mathematics", "MATH", "02001"),
    ("English Language Arts", "ELA", "01001"),
    ("Science", "SCI", "03001"),
    ("Social Studies", "SOC", "04001"),
    ("Physical Education", "PE", "08001"),
    ("Visual Arts", "ART", "05154"),
    ("Music", "MUS", "05101"),
    ("Spanish", "SPAN", "06101"),
    ("Computer Science", "CS", "10011"),
)
_HOMEROOM = ("Homeroom", "HR", "")  # no subject code: subjects/subjectCodes stay consistent

_SCHOOL_NAMES = (
    "Lincoln",
    "Washington",
    "Jefferson",
    "Roosevelt",
    "César Chávez",
    "Martin Luther King Jr.",
    "Sojourner Truth",
    "Riverside",
    "Oak Grove",
    "Maple Heights",
    "Lakeview",
    "Hillcrest",
    "Sunnyvale",
    "Cedar Park",
    "Pioneer",
    "Sacagawea",
    "Eastwood",
    "Westbrook",
    "Northridge",
    "Southgate",
    "Frida Kahlo",
    "O'Keeffe",
    "Thurgood Marshall",
    "Grace Hopper",
)

_FEMALE = (
    "Mary",
    "Olivia",
    "Emma",
    "Sophia",
    "Ava",
    "Isabella",
    "Mia",
    "Charlotte",
    "Amelia",
    "Harper",
    "Zoë",
    "Chloé",
    "Siobhán",
    "Aaliyah",
    "Mei",
    "Priya",
    "Fatima",
    "Ngozi",
    "Ximena",
    "Léa",
    "Hannah",
    "Grace",
    "Nora",
    "Saoirse",
    "Yuki",
    "Ingrid",
    "Renée",
    "Olivia",
)
_MALE = (
    "James",
    "Liam",
    "Noah",
    "Oliver",
    "Elijah",
    "Lucas",
    "Mason",
    "Ethan",
    "Logan",
    "Jacob",
    "José",
    "André",
    "Søren",
    "Łukasz",
    "François",
    "Jürgen",
    "Mateo",
    "Diego",
    "Omar",
    "Kwame",
    "Hiroshi",
    "Arjun",
    "Thanh",
    "Kyle",
    "Peter",
    "Roland",
    "Björn",
    "Liam",
)
_FAMILY = (
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernández",
    "López",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Pérez",
    "Thompson",
    "White",
    "Harris",
    "Sánchez",
    "Clark",
    "Ramírez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyễn",
    "O'Brien",
    "Müller",
    "Kowalski",
    "Østergaard",
    "Đặng",
    "Schröder",
    "Öztürk",
    "Kim",
    "Patel",
    "Chen",
    "Okafor",
    "Archer",
    "Hughes",
    "Nash",
    "Mahoney",
    "Phillips",
    "Caldwell",
    "Hardy",
    "Turner",
    "Christian",
    "Preston",
    "MacDonald",
    "D'Angelo",
    "Van der Berg",
)
# Rare nicknames: exercise RFC 4180 quote doubling.
_NICKNAMES = ('"Bo"', 'Lee "Skip"', 'Ann "Annie"')

_ASCII_FOLD = str.maketrans({"đ": "d", "Đ": "D", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "ß": "ss"})


def _ascii_slug(name: str) -> str:
    """Lower-case ASCII letters only ("Nguyễn" -> "nguyen", "O'Brien" -> "obrien")."""
    folded = unicodedata.normalize("NFKD", name.translate(_ASCII_FOLD))
    return "".join(ch for ch in folded.lower() if "a" <= ch <= "z")


_FAMILY_INDEX = {name: i for i, name in enumerate(_FAMILY)}

_HEX = np.frombuffer(b"0123456789ABCDEF", dtype=np.uint8)
_PASSWORD_ALPHABET = np.frombuffer(
    b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789", dtype=np.uint8
)

# --------------------------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistrictSpec:
    """What to generate.  Schools = ceil(students / students_per_school), at least 1."""

    district_id: str = "demo-district"
    students: int = 500
    seed: int = 7
    students_per_school: int = 500
    enrollments_per_student: int = 6
    students_per_class: int = 25
    higher_ed: bool = False

    @property
    def schools(self) -> int:
        return max(1, math.ceil(self.students / self.students_per_school))


@dataclass
class GeneratedDistrict:
    """A district as OneRoster 1.1 frames (all columns ``str``, exact headers in spec order).

    ``frames`` keys: orgs, academicSessions, courses, classes, users, enrollments, demographics.
    A key may be left out (e.g. demographics switched off); :func:`write_delivery` then marks
    that file ``absent`` in the manifest.
    """

    spec: DistrictSpec
    frames: dict[str, pd.DataFrame]

    def ids(self, kind: str, role: str | None = None) -> list[str]:
        """sourcedIds of one file (optionally only the users with ``role``)."""
        frame = self.frames[kind]
        if role is not None:
            frame = frame[frame["role"] == role]
        return frame["sourcedId"].tolist()


# --------------------------------------------------------------------------------------------
# Vectorised string helpers (numpy byte matrices and pyarrow compute)
# --------------------------------------------------------------------------------------------


def _from_matrix(mat: np.ndarray) -> pa.Array:
    """(n, w) uint8 matrix of ASCII bytes -> large_string array, zero-copy."""
    mat = np.ascontiguousarray(mat, dtype=np.uint8)
    n, width = mat.shape
    offsets = np.arange(n + 1, dtype=np.int64) * width
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(mat))


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Zero-padded decimal digits of non-negative ints as an (n, width) uint8 matrix."""
    v = np.asarray(values, dtype=np.int64).copy()
    out = np.empty((len(v), width), dtype=np.uint8)
    for k in range(width - 1, -1, -1):
        out[:, k] = v % 10 + 48
        v //= 10
    return out


def _prefixed_digits(prefix: str, values: np.ndarray, width: int) -> pa.Array:
    head = np.frombuffer(prefix.encode("ascii"), dtype=np.uint8)
    mat = np.empty((len(values), len(head) + width), dtype=np.uint8)
    mat[:, : len(head)] = head
    mat[:, len(head) :] = _digits(values, width)
    return _from_matrix(mat)


def _guids(rng: np.random.Generator, n: int) -> pa.Array:
    """Upper-case GUID-like strings (version-4 layout), e.g. 6F4283DC-F831-4437-A9A3-E030C7AF0493."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexed = np.empty((n, 32), dtype=np.uint8)
    hexed[:, 0::2] = _HEX[raw >> 4]
    hexed[:, 1::2] = _HEX[raw & 0x0F]
    out = np.full((n, 36), ord("-"), dtype=np.uint8)
    out[:, 0:8] = hexed[:, 0:8]
    out[:, 9:13] = hexed[:, 8:12]
    out[:, 14:18] = hexed[:, 12:16]
    out[:, 19:23] = hexed[:, 16:20]
    out[:, 24:36] = hexed[:, 20:32]
    return _from_matrix(out)


def _affine(rng: np.random.Generator, n: int, modulus: int) -> np.ndarray:
    """n distinct, random-looking integers in [0, modulus) (affine map of a permutation)."""
    if n > modulus:
        raise ValueError(f"cannot draw {n} distinct ids below {modulus}")
    a = int(rng.integers(modulus // 3, modulus)) | 1
    while a % 5 == 0 or math.gcd(a, modulus) != 1:
        a += 2
    b = int(rng.integers(0, modulus))
    return (rng.permutation(n).astype(np.int64) * a + b) % modulus


def _pool(values: Sequence[str]) -> pa.Array:
    return pa.array(list(values), type=_L)


def _take(values: Sequence[str] | pa.Array, idx: np.ndarray) -> pa.Array:
    pool = values if isinstance(values, pa.Array) else _pool(values)
    return pool.take(pa.array(np.asarray(idx, dtype=np.int64)))


def _const(value: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, _L), n)


def _num(values: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(np.asarray(values, dtype=np.int64)), _L)


def _as_large(part: object) -> object:
    if isinstance(part, str):
        return pa.scalar(part, _L)
    if isinstance(part, pa.Array | pa.ChunkedArray) and part.type != _L:
        return part.cast(_L)
    return part


def _cat(*parts: object) -> pa.Array:
    """Element-wise string concatenation of arrays and str scalars."""
    return pc.binary_join_element_wise(*(_as_large(p) for p in parts), _EMPTY)


def _where(mask: np.ndarray, yes: object, no: object) -> pa.Array:
    return pc.if_else(pa.array(np.asarray(mask, dtype=bool)), _as_large(yes), _as_large(no))


def _concat(*arrays: pa.Array) -> pa.Array:
    return pa.concat_arrays([a.cast(_L) if a.type != _L else a for a in arrays])


def _frame(kind: str, n: int, cols: dict[str, object]) -> pd.DataFrame:
    """Frame with the exact 1.1 header of ``kind``; missing columns are empty strings."""
    data: dict[str, pd.Series] = {}
    for name in ONEROSTER_11_HEADERS[kind]:
        value = cols.get(name, "")
        if isinstance(value, str):
            value = _const(value, n)
        elif isinstance(value, pa.Array | pa.ChunkedArray):
            if value.type != _L:
                value = value.cast(_L)
        else:
            value = pa.array(list(value), type=_L)
        if len(value) != n:
            raise AssertionError(f"{kind}.{name}: {len(value)} values for {n} rows")
        data[name] = pd.Series(value, dtype="str")
    unknown = set(cols) - set(ONEROSTER_11_HEADERS[kind])
    if unknown:
        raise AssertionError(f"{kind}: unknown columns {sorted(unknown)}")
    return pd.DataFrame(data)


def _rows_frame(kind: str, rows: list[dict[str, str]]) -> pd.DataFrame:
    cols = {name: [row.get(name, "") for row in rows] for name in ONEROSTER_11_HEADERS[kind]}
    return _frame(kind, len(rows), cols)


def _bool_str(mask: np.ndarray) -> pa.Array:
    return _take(("false", "true"), np.asarray(mask, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _validate(spec: DistrictSpec) -> None:
    if not spec.district_id:
        raise ValueError("district_id must not be empty")
    if spec.students < 0:
        raise ValueError("students must be >= 0")
    if spec.students_per_school < 1 or spec.students_per_class < 1:
        raise ValueError("students_per_school and students_per_class must be >= 1")
    if spec.enrollments_per_student < 0:
        raise ValueError("enrollments_per_student must be >= 0")
    if spec.students >= 10**8:
        raise ValueError("at most 99,999,999 students")


def _sessions(spec: DistrictSpec) -> tuple[pd.DataFrame, dict[str, str], list[tuple[str, str]]]:
    did, year = spec.district_id, SCHOOL_YEAR
    sy, s1, s2 = f"{did}-{year}-SY", f"{did}-{year}-S1", f"{did}-{year}-S2"
    if spec.higher_ed:
        t1 = (f"Fall {year - 1}", f"{year - 1}-08-24", f"{year - 1}-12-11")
        t2 = (f"Spring {year}", f"{year}-01-11", f"{year}-05-07")
        full = (f"{year - 1}-{year} Academic Year", f"{year - 1}-08-24", f"{year}-05-07")
    else:
        t1 = (f"{year - 1}-{year} Fall Semester", f"{year - 1}-08-17", f"{year - 1}-12-18")
        t2 = (f"{year - 1}-{year} Spring Semester", f"{year}-01-05", f"{year}-06-11")
        full = (f"{year - 1}-{year} School Year", f"{year - 1}-08-17", f"{year}-06-11")
    rows = [
        {
            "sourcedId": sy,
            "title": full[0],
            "type": "schoolYear",
            "startDate": full[1],
            "endDate": full[2],
            "schoolYear": str(year),
        },
        {
            "sourcedId": s1,
            "title": t1[0],
            "type": "semester",
            "startDate": t1[1],
            "endDate": t1[2],
            "parentSourcedId": sy,
            "schoolYear": str(year),
        },
        {
            "sourcedId": s2,
            "title": t2[0],
            "type": "semester",
            "startDate": t2[1],
            "endDate": t2[2],
            "parentSourcedId": sy,
            "schoolYear": str(year),
        },
    ]
    ids = {"sy": sy, "s1": s1, "s2": s2}
    # term kind 0 = full year (both semesters), 1 = fall, 2 = spring -> (begin, end)
    dates = [(full[1], full[2]), (t1[1], t1[2]), (t2[1], t2[2])]
    return _rows_frame("academicSessions", rows), ids, dates


def generate_district(spec: DistrictSpec) -> GeneratedDistrict:
    """Generate a whole district deterministically from ``spec``."""
    _validate(spec)
    rng = np.random.default_rng([spec.seed, zlib.crc32(spec.district_id.encode("utf-8"))])
    did = spec.district_id
    n_stu = spec.students
    n_sch = spec.schools
    eps = spec.enrollments_per_student
    domain = f"{did.lower()}.example.{'edu' if spec.higher_ed else 'org'}"

    sessions, term_ids, term_dates = _sessions(spec)

    # ---- orgs ------------------------------------------------------------------------------
    district_sid = f"{did}-org"
    lea = int(rng.integers(100_000, 5_700_000))  # NCES-like 7-digit LEA id (leading zero often)
    if spec.higher_ed:
        level = np.full(n_sch, 4, dtype=np.int64)
    elif n_sch < 6:
        level = np.full(n_sch, 3, dtype=np.int64)
    else:
        level = np.arange(n_sch, dtype=np.int64) % 3
    school_idx = np.arange(n_sch)
    school_sid = _prefixed_digits(f"{did}-sch-", school_idx + 1, 4)
    base = np.array(_SCHOOL_NAMES, dtype=object)[school_idx % len(_SCHOOL_NAMES)]
    suffix = np.array([lv[1] for lv in _LEVELS], dtype=object)[level]
    campus = school_idx // len(_SCHOOL_NAMES)
    school_names = [
        f"{b} {s}" + (f" {c + 1}" if c else "")
        for b, s, c in zip(base, suffix, campus, strict=True)
    ]
    district_title = did.replace("-", " ").replace("_", " ").title()
    district_name = f"{district_title} {'University' if spec.higher_ed else 'Public Schools'}"
    orgs = pd.concat(
        [
            _rows_frame(
                "orgs",
                [
                    {
                        "sourcedId": district_sid,
                        "name": district_name,
                        "type": "district",
                        "identifier": f"{lea:07d}",
                    }
                ],
            ),
            _frame(
                "orgs",
                n_sch,
                {
                    "sourcedId": school_sid,
                    "name": school_names,
                    "type": "school",
                    "identifier": _prefixed_digits(f"{lea:07d}", school_idx + 1, 5),
                    "parentSourcedId": district_sid,
                },
            ),
            _rows_frame(
                "orgs",
                [
                    {
                        "sourcedId": f"{did}-dept-01",
                        "name": "Special Education Services",
                        "type": "department",
                        "parentSourcedId": district_sid,
                    }
                ],
            ),
        ],
        ignore_index=True,
    )

    # ---- students: school, grade, rank within (school, grade) --------------------------------
    weights = rng.uniform(0.75, 1.25, n_sch)
    bounds = np.rint(np.cumsum(weights) / weights.sum() * n_stu).astype(np.int64)
    bounds[-1] = n_stu
    stu_school = np.searchsorted(bounds, np.arange(n_stu), side="right")
    stu_grade = np.zeros(n_stu, dtype=np.int64)
    stu_level = level[stu_school]
    in_band = np.zeros((n_sch, _NG), dtype=bool)
    for lv, (grades, _suffix) in enumerate(_LEVELS):
        in_band[np.ix_(level == lv, grades)] = True
        sel = np.flatnonzero(stu_level == lv)
        if len(sel):
            p = np.array([0.5 if g == 0 else 1.0 for g in grades])
            stu_grade[sel] = rng.choice(np.array(grades), size=len(sel), p=p / p.sum())
    stu_group = stu_school * _NG + stu_grade
    n_groups = n_sch * _NG
    group_count = np.bincount(stu_group, minlength=n_groups)
    perm = rng.permutation(n_stu)
    ordered = perm[np.argsort(stu_group[perm], kind="stable")]
    group_first = np.cumsum(group_count) - group_count
    stu_rank = np.empty(n_stu, dtype=np.int64)
    stu_rank[ordered] = np.arange(n_stu) - group_first[stu_group[ordered]]

    # ---- courses (district-level, a handful per grade) --------------------------------------
    subjects = ([] if spec.higher_ed else [_HOMEROOM]) + list(_ACADEMIC)
    n_subj = len(subjects)
    first_academic = 0 if spec.higher_ed else 1
    course_sid, course_title, course_code, course_grade, course_subject = [], [], [], [], []
    for g in range(_NG):
        for s, (subject, stem, code) in enumerate(subjects):
            course_sid.append(f"{code or '00100'}{g:03d}")
            if g == _PS:
                level_no = 100 * (1 + s % 2) + s
                course_title.append(f"{subject} {level_no}")
                course_code.append(f"{stem}-{level_no}")
            else:
                course_title.append(f"{subject} - {_GRADE_LABELS[g]}")
                course_code.append(f"{stem}-{_GRADE_CODES[g]}")
            course_grade.append(_GRADE_CODES[g])
            course_subject.append(s)
    grades_used = np.flatnonzero(in_band.any(axis=0))
    course_rows = (grades_used[:, None] * n_subj + np.arange(n_subj)[None, :]).ravel()
    subj_names = [s[0] for s in subjects]
    subj_codes = [s[2] for s in subjects]
    courses = _frame(
        "courses",
        len(course_rows),
        {
            "sourcedId": _take(course_sid, course_rows),
            "schoolYearSourcedId": term_ids["sy"],
            "title": _take(course_title, course_rows),
            "courseCode": _take(course_code, course_rows),
            "grades": _take(course_grade, course_rows),
            "orgSourcedId": district_sid,
            "subjects": _take(subj_names, np.array(course_subject)[course_rows]),
            "subjectCodes": _take(subj_codes, np.array(course_subject)[course_rows]),
        },
    )

    # ---- classes: per (school, grade) enough sections for ~students_per_class ---------------
    need = np.ceil(group_count * eps / spec.students_per_class).astype(np.int64)
    class_count = np.where(in_band.ravel(), np.maximum(np.maximum(need, eps), 1), 0)
    n_cls = int(class_count.sum())
    class_first = np.cumsum(class_count) - class_count
    class_group = np.repeat(np.arange(n_groups), class_count)
    class_in_group = np.arange(n_cls) - class_first[class_group]
    class_school = class_group // _NG
    class_grade = class_group % _NG
    if spec.higher_ed:
        class_subject = class_in_group % n_subj
        section = class_in_group // n_subj + 1
    else:
        homeroom = class_in_group == 0
        academic_i = np.maximum(class_in_group - 1, 0)
        class_subject = np.where(homeroom, 0, first_academic + academic_i % (n_subj - 1))
        section = np.where(homeroom, 1, academic_i // (n_subj - 1) + 1)
    class_course = class_grade * n_subj + class_subject
    cls_sid = _where(
        rng.random(n_cls) < 0.25,
        _guids(rng, n_cls),
        _from_matrix(_digits(_affine(rng, n_cls, 10**9), 9)),
    )
    if spec.higher_ed:
        class_term = rng.choice(3, size=n_cls, p=[0.05, 0.5, 0.45])
    else:
        class_term = np.where(class_in_group == 0, 0, rng.choice(3, size=n_cls, p=[0.6, 0.2, 0.2]))
    term_lists = (f"{term_ids['s1']},{term_ids['s2']}", term_ids["s1"], term_ids["s2"])
    period_pool = [str(p) for p in range(1, 9)] + [f"{p},{p + 1}" for p in range(1, 8)]
    period = rng.integers(0, 8, n_cls) + np.where(rng.random(n_cls) < 0.1, 8, 0)
    period = np.minimum(period, len(period_pool) - 1)
    section_str = _from_matrix(_digits(section, 2))
    classes = _frame(
        "classes",
        n_cls,
        {
            "sourcedId": cls_sid,
            "title": _cat(_take(course_title, class_course), " - Section ", section_str),
            "grades": _take(_GRADE_CODES, class_grade),
            "courseSourcedId": _take(course_sid, class_course),
            "classCode": _cat(_take(course_code, class_course), "-", section_str),
            "classType": _where(
                (class_subject == 0) & (not spec.higher_ed), "homeroom", "scheduled"
            ),
            "location": _cat("Room ", _num(rng.integers(100, 400, n_cls))),
            "schoolSourcedId": school_sid.take(pa.array(class_school)),
            "termSourcedIds": _take(term_lists, class_term),
            "subjects": _take(subj_names, class_subject),
            "subjectCodes": _take(subj_codes, class_subject),
            "periods": _take(period_pool, period),
        },
    )

    # ---- staff ------------------------------------------------------------------------------
    school_students = np.bincount(stu_school, minlength=n_sch)
    tps = np.maximum(1, np.rint(school_students / 20).astype(np.int64))
    n_tch = int(tps.sum())
    teacher_first = np.cumsum(tps) - tps
    teacher_school = np.repeat(np.arange(n_sch), tps)
    school_class_first = np.searchsorted(class_school, np.arange(n_sch))
    class_local = np.arange(n_cls) - school_class_first[class_school]
    class_teacher = teacher_first[class_school] + class_local % tps[class_school]
    co_mask = (rng.random(n_cls) < 0.05) & (tps[class_school] >= 2)
    co_teacher = (teacher_first[class_school] + (class_local + 1) % tps[class_school])[co_mask]
    multi_teacher = -1
    if n_sch >= 2:
        multi_teacher = int(teacher_first[0])
        class_teacher[school_class_first[1]] = multi_teacher

    # ---- users ------------------------------------------------------------------------------
    n_dadm, n_sadm = 3, n_sch  # 2 district admins + 1 school-and-district admin; 1 per school
    n_staff = n_dadm + n_sadm + n_tch
    n_users = n_staff + n_stu
    off_tch, off_stu = n_dadm + n_sadm, n_staff
    role_code = np.concatenate(
        [np.zeros(n_dadm + n_sadm, np.int64), np.ones(n_tch, np.int64), np.full(n_stu, 2)]
    )
    is_stu = role_code == 2

    admin_sid = _prefixed_digits("ADM-", np.arange(1, n_dadm + n_sadm + 1), 5)
    teacher_sid = _where(
        rng.random(n_tch) < 0.7,
        _guids(rng, n_tch),
        _prefixed_digits("T", _affine(rng, n_tch, 10**7), 7),
    )
    student_sid = _where(
        rng.random(n_stu) < 0.15,
        _guids(rng, n_stu),
        _from_matrix(_digits(_affine(rng, n_stu, 10**8), 8)),
    )
    user_sid = _concat(admin_sid, teacher_sid, student_sid)

    school0 = school_sid[0].as_py()
    teacher_orgs = school_sid.take(pa.array(teacher_school))
    if multi_teacher >= 0:
        teacher_orgs = _where(
            np.arange(n_tch) == multi_teacher, f"{school0},{school_sid[1].as_py()}", teacher_orgs
        )
    user_orgs = _concat(
        _pool([district_sid, district_sid, f"{school0},{district_sid}"]),
        school_sid,
        teacher_orgs,
        school_sid.take(pa.array(stu_school)),
    )

    sex = rng.integers(0, 2, n_users)  # 0 female, 1 male
    fem = rng.integers(0, len(_FEMALE), n_users)
    mal = rng.integers(0, len(_MALE), n_users)
    given = _where(sex == 0, _take(_FEMALE, fem), _take(_MALE, mal))
    given_ascii = _where(
        sex == 0,
        _take([_ascii_slug(x) for x in _FEMALE], fem),
        _take([_ascii_slug(x) for x in _MALE], mal),
    )
    fam = rng.integers(0, len(_FAMILY), n_users)
    family = _take(_FAMILY, fam)
    family_ascii = _take([_ascii_slug(x) for x in _FAMILY], fam)
    middle_roll = rng.random(n_users)
    middle_given = _where(
        sex == 0,
        _take(_FEMALE, rng.integers(0, len(_FEMALE), n_users)),
        _take(_MALE, rng.integers(0, len(_MALE), n_users)),
    )
    middle = _where(middle_roll < 0.35, middle_given, "")
    middle = _where(
        middle_roll < 0.001, _take(_NICKNAMES, rng.integers(0, len(_NICKNAMES), n_users)), middle
    )
    username = _cat(given_ascii, ".", family_ascii, _num(np.arange(1, n_users + 1)))
    email_domain = _where(is_stu, f"@students.{domain}", f"@{domain}")
    user_grade = np.concatenate([np.full(n_staff, -1, np.int64), stu_grade])
    no_email = is_stu & (user_grade <= 1)  # PK / KG students usually have no mailbox
    email = _where(no_email, "", _cat(username, email_domain))

    staff_ident = _prefixed_digits("E", _affine(rng, n_staff, 10**6), 6)
    stu_ident = _from_matrix(_digits(_affine(rng, n_stu, 10**8), 8))
    identifier = _concat(staff_ident, stu_ident)
    two_ids = rng.random(n_users) < 0.1
    stu_user_ids = _where(
        two_ids[off_stu:],
        _cat("{SIS:", stu_ident, "},{LDAP:", username.slice(off_stu), "}"),
        _cat("{SIS:", stu_ident, "}"),
    )
    user_ids = _concat(
        _const("", n_dadm + n_sadm),
        _cat("{HR:", staff_ident.slice(off_tch), "}"),
        stu_user_ids,
    )
    phone_mat = np.frombuffer(b"(555) 000 0000" * n_users, dtype=np.uint8).reshape(n_users, 14)
    phone_mat = phone_mat.copy()
    phone_mat[:, 6:9] = _digits(rng.integers(200, 1000, n_users), 3)
    phone_mat[:, 10:14] = _digits(rng.integers(0, 10_000, n_users), 4)
    phone = _where(~is_stu & (rng.random(n_users) < 0.6), _from_matrix(phone_mat), "")
    pw_idx = rng.integers(0, len(_PASSWORD_ALPHABET), size=(n_users, 10))
    password = _where(
        is_stu & (rng.random(n_users) < 0.05), _from_matrix(_PASSWORD_ALPHABET[pw_idx]), ""
    )
    enabled = _bool_str(rng.random(n_users) >= 0.01)
    grades_col = _where(is_stu, _take(_GRADE_CODES, np.maximum(user_grade, 0)), "")
    users = _frame(
        "users",
        n_users,
        {
            "sourcedId": user_sid,
            "enabledUser": enabled,
            "orgSourcedIds": user_orgs,
            "role": _take(("administrator", "teacher", "student"), role_code),
            "username": username,
            "userIds": user_ids,
            "givenName": given,
            "familyName": family,
            "middleName": middle,
            "identifier": identifier,
            "email": email,
            "phone": phone,
            "grades": grades_col,
            "password": password,
        },
    )

    # ---- enrollments ------------------------------------------------------------------------
    begin_pool = [d[0] for d in term_dates]
    end_pool = [d[1] for d in term_dates]
    stu_cls = (
        class_first[stu_group][:, None]
        + (stu_rank[:, None] * eps + np.arange(eps)[None, :]) % class_count[stu_group][:, None]
    ).ravel()
    stu_of = np.repeat(np.arange(n_stu), eps)
    enr_cls = np.concatenate([np.arange(n_cls), np.flatnonzero(co_mask), stu_cls])
    enr_role = np.concatenate(
        [np.zeros(n_cls, np.int64), np.zeros(len(co_teacher), np.int64), np.ones(len(stu_cls))]
    ).astype(np.int64)
    enr_primary = np.concatenate(
        [np.ones(n_cls, np.int64), np.zeros(len(co_teacher) + len(stu_cls), np.int64)]
    )
    enr_user = _concat(
        teacher_sid.take(pa.array(class_teacher)),
        teacher_sid.take(pa.array(co_teacher)),
        student_sid.take(pa.array(stu_of)),
    )
    enr_class_sid = cls_sid.take(pa.array(enr_cls))
    n_enr = len(enr_cls)
    enrollments = _frame(
        "enrollments",
        n_enr,
        {
            "sourcedId": _cat(enr_class_sid, "-", enr_user),
            "classSourcedId": enr_class_sid,
            "schoolSourcedId": school_sid.take(pa.array(class_school[enr_cls])),
            "userSourcedId": enr_user,
            "role": _take(("teacher", "student"), enr_role),
            "primary": _bool_str(enr_primary),
            "beginDate": _take(begin_pool, class_term[enr_cls]),
            "endDate": _take(end_pool, class_term[enr_cls]),
        },
    )

    # ---- demographics (students) ------------------------------------------------------------
    stu_sex = sex[off_stu:]
    start_year = SCHOOL_YEAR - 1
    age = _GRADE_AGE[stu_grade] + np.where(stu_grade == _PS, rng.integers(0, 5, n_stu), 0)
    birth = (
        (start_year - age - 1 - 1970).astype("datetime64[Y]").astype("datetime64[D]")
        + np.timedelta64(243, "D")  # ~1 September of the year before the cut-off
        + rng.integers(0, 365, n_stu).astype("timedelta64[D]")
    )
    race = rng.choice(6, size=n_stu, p=[0.01, 0.06, 0.15, 0.005, 0.735, 0.04])
    hispanic = rng.random(n_stu) < 0.27
    country = _where(
        rng.random(n_stu) < 0.92,
        "US",
        _take(("MX", "VN", "IN", "CN", "PH", "SV", "UA", "NG"), rng.integers(0, 8, n_stu)),
    )
    race_cols = (
        "americanIndianOrAlaskaNative",
        "asian",
        "blackOrAfricanAmerican",
        "nativeHawaiianOrOtherPacificIslander",
        "white",
        "demographicRaceTwoOrMoreRaces",
    )
    demographics = _frame(
        "demographics",
        n_stu,
        {
            "sourcedId": student_sid,
            "birthDate": pc.cast(pa.array(birth), pa.string()),
            "sex": _take(("female", "male"), stu_sex),
            **{col: _bool_str(race == k) for k, col in enumerate(race_cols)},
            "hispanicOrLatinoEthnicity": _bool_str(hispanic),
            "countryOfBirthCode": country,
        },
    )

    frames = {
        "orgs": orgs,
        "academicSessions": sessions,
        "courses": courses,
        "classes": classes,
        "users": users,
        "enrollments": enrollments,
        "demographics": demographics,
    }
    return GeneratedDistrict(spec=spec, frames=frames)


# --------------------------------------------------------------------------------------------
# Writing (RFC 4180, minimal quoting, optional BOM / CRLF / zip)
# --------------------------------------------------------------------------------------------

_CHUNK_ROWS = 262_144
_ZIP_TIME = (2026, 1, 1, 0, 0, 0)


def _column_array(series: pd.Series) -> pa.ChunkedArray:
    if isinstance(series.dtype, pd.StringDtype) and series.dtype.storage == "pyarrow":
        arr = pa.array(series.array)
    else:
        arr = pa.array(series.astype("str").array)
    if isinstance(arr, pa.Array):
        arr = pa.chunked_array([arr])
    if arr.type != _L:
        arr = arr.cast(_L)
    if arr.null_count:
        arr = arr.fill_null(_EMPTY)
    return arr


def _needs_quotes(arr: pa.Array) -> bool:
    """Whether any value of ``arr`` contains a comma, quote, CR or LF (memchr-speed scan)."""
    raw = bytes(_array_bytes(arr))
    return any(raw.find(ch) >= 0 for ch in (b",", b'"', b"\n", b"\r"))


def _quote_py(value: str) -> str:
    if any(ch in value for ch in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def _quote(arr: pa.Array) -> pa.Array:
    needs = pc.match_substring_regex(arr, r'[,"\r\n]')
    quoted = pc.binary_join_element_wise(
        _EMPTY, pc.replace_substring(arr, '"', '""'), _EMPTY, pa.scalar('"', _L)
    )
    return pc.if_else(needs, quoted, arr)


def _array_bytes(arr: pa.Array) -> memoryview | bytes:
    _validity, offsets_buf, data = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)
    start, end = int(offsets[0]), int(offsets[-1])
    if end == start or data is None:
        return b""
    return memoryview(data)[start:end]


def _write_csv(fh: BinaryIO, frame: pd.DataFrame, *, bom: bool, eol: str) -> None:
    header = ",".join(_quote_py(str(c)) for c in frame.columns) + eol
    fh.write((b"\xef\xbb\xbf" if bom else b"") + header.encode("utf-8"))
    n = len(frame)
    if n == 0 or frame.shape[1] == 0:
        return
    columns = [_column_array(frame.iloc[:, i]) for i in range(frame.shape[1])]
    eol_s = pa.scalar(eol, _L)
    for start in range(0, n, _CHUNK_ROWS):
        parts = []
        for col in columns:
            part = col.slice(start, _CHUNK_ROWS).combine_chunks()
            parts.append(_quote(part) if _needs_quotes(part) else part)
        parts[-1] = pc.binary_join_element_wise(parts[-1], _EMPTY, eol_s)
        lines = (
            parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, pa.scalar(",", _L))
        )
        fh.write(_array_bytes(lines))


def _manifest(district: GeneratedDistrict) -> pd.DataFrame:
    rows = [("manifest.version", "1.0"), ("oneroster.version", "1.1")]
    rows += [
        (f"file.{name}", "bulk" if name in district.frames else "absent")
        for name in MANIFEST_FILES_11
    ]
    rows.append(("source.systemName", "ClassLink"))
    return pd.DataFrame(rows, columns=["propertyName", "value"], dtype="str")


def write_delivery(
    district: GeneratedDistrict,
    out_dir: Path,
    *,
    as_zip: bool = False,
    bom: bool = False,
    crlf: bool = False,
) -> Path:
    """Write ``manifest.csv`` and one CSV per frame, RFC 4180 with minimal quoting.

    Loose files go into ``out_dir`` (created; stale OneRoster CSVs that are now ``absent`` are
    removed) and the folder is returned.  With ``as_zip`` a single zip with the files at its root
    is written to ``out_dir`` itself when it ends in ``.zip``, otherwise to
    ``out_dir / f"{district_id}.zip"``; the zip path is returned.  ``bom`` prefixes every file
    with a UTF-8 BOM, ``crlf`` ends lines with CRLF.
    """
    out_dir = Path(out_dir)
    unknown = set(district.frames) - set(MANIFEST_FILES_11)
    if unknown:
        raise ValueError(f"not OneRoster 1.1 files: {sorted(unknown)}")
    eol = "\r\n" if crlf else "\n"
    files: list[tuple[str, pd.DataFrame]] = [("manifest", _manifest(district))]
    files += [
        (name, district.frames[name]) for name in MANIFEST_FILES_11 if name in district.frames
    ]

    if as_zip:
        zip_path = (
            out_dir
            if out_dir.suffix.lower() == ".zip"
            else out_dir / f"{district.spec.district_id}.zip"
        )
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(
            zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1
        ) as zf:
            for name, frame in files:
                info = zipfile.ZipInfo(f"{name}.csv", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                big = frame.memory_usage(deep=False).sum() + 4 * frame.size > (1 << 30)
                with zf.open(info, "w", force_zip64=bool(big)) as fh:
                    _write_csv(fh, frame, bom=bom, eol=eol)
        return zip_path

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in MANIFEST_FILES_11:
        if name not in district.frames:
            (out_dir / f"{name}.csv").unlink(missing_ok=True)
    for name, frame in files:
        with open(out_dir / f"{name}.csv", "wb", buffering=1 << 20) as fh:
            _write_csv(fh, frame, bom=bom, eol=eol)
    return out_dir


# --------------------------------------------------------------------------------------------
# Nightly evolution helpers (pure: always return a new GeneratedDistrict)
# --------------------------------------------------------------------------------------------


def _derive(d: GeneratedDistrict, **changed: pd.DataFrame) -> GeneratedDistrict:
    # Shallow copies are safe under pandas copy-on-write: writes to one never reach the other.
    frames = {k: (changed[k] if k in changed else v.copy(deep=False)) for k, v in d.frames.items()}
    return GeneratedDistrict(spec=d.spec, frames=frames)


def _count(fraction: float, n: int) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    k = round(fraction * n)
    if fraction > 0 and n > 0:
        k = max(k, 1)
    return min(k, n)


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, salt])


def _pick(mask: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    candidates = np.flatnonzero(mask)
    k = _count(fraction, len(candidates))
    return np.sort(rng.choice(candidates, size=k, replace=False)) if k else candidates[:0]


def _replace_at(series: pd.Series, positions: np.ndarray, values: Sequence[str]) -> pd.Series:
    """New Series equal to ``series`` with ``values`` at sorted ``positions``."""
    mask = np.zeros(len(series), dtype=bool)
    mask[positions] = True
    arr = _column_array(series).combine_chunks()
    new = pc.replace_with_mask(arr, pa.array(mask), pa.array(list(values), type=_L))
    return pd.Series(new, dtype="str", index=series.index, name=series.name)


def _drop_rows(frame: pd.DataFrame, mask: pd.Series | np.ndarray) -> pd.DataFrame:
    return frame[~np.asarray(mask, dtype=bool)].reset_index(drop=True)


def remove_students(
    d: GeneratedDistrict, fraction: float, seed: int
) -> tuple[GeneratedDistrict, list[str]]:
    """Drop ``fraction`` of the students (users rows, enrollments, demographics)."""
    users = d.frames["users"]
    chosen = _pick((users["role"] == "student").to_numpy(), fraction, _rng(seed, 1))
    removed = users["sourcedId"].iloc[chosen].tolist()
    gone = pd.Index(removed)
    mask = np.zeros(len(users), dtype=bool)
    mask[chosen] = True
    changed = {
        "users": _drop_rows(users, mask),
        "enrollments": _drop_rows(
            d.frames["enrollments"], d.frames["enrollments"]["userSourcedId"].isin(gone)
        ),
    }
    if "demographics" in d.frames:
        demo = d.frames["demographics"]
        changed["demographics"] = _drop_rows(demo, demo["sourcedId"].isin(gone))
    return _derive(d, **changed), removed


def _class_dates(d: GeneratedDistrict, term_lists: pd.Series) -> tuple[pd.Series, pd.Series]:
    sessions = d.frames["academicSessions"]
    start = dict(zip(sessions["sourcedId"], sessions["startDate"], strict=True))
    end = dict(zip(sessions["sourcedId"], sessions["endDate"], strict=True))
    begin_of: dict[str, str] = {}
    end_of: dict[str, str] = {}
    for terms in term_lists.unique():  # a handful of distinct term lists
        ids = [t.strip() for t in str(terms).split(",") if t.strip() in start]
        begin_of[terms] = min((start[t] for t in ids), default="")
        end_of[terms] = max((end[t] for t in ids), default="")
    return term_lists.map(begin_of).astype("str"), term_lists.map(end_of).astype("str")


def move_students(
    d: GeneratedDistrict, fraction: float, seed: int
) -> tuple[GeneratedDistrict, list[str]]:
    """Move ``fraction`` of the students to another school serving their grade.

    Their ``orgSourcedIds`` becomes the new school and their student enrollments are replaced by
    the same number of enrollments in classes of that school and grade (new enrollment sourcedIds,
    built from class + user).  Students whose grade no other school teaches stay put and are not
    reported.
    """
    rng = _rng(seed, 2)
    users, classes, enr = d.frames["users"], d.frames["classes"], d.frames["enrollments"]
    chosen = _pick((users["role"] == "student").to_numpy(), fraction, rng)
    sub = users.iloc[chosen][["sourcedId", "orgSourcedIds", "grades"]].reset_index(drop=True)
    sub["pos"] = chosen

    cls = classes[["sourcedId", "schoolSourcedId", "grades", "termSourcedIds"]]
    cls = cls.sort_values(["schoolSourcedId", "grades"], kind="stable").reset_index(drop=True)
    new_school = pd.Series(pd.NA, index=sub.index, dtype="str")
    for grade in sorted(sub["grades"].unique()):
        sel = (sub["grades"] == grade).to_numpy()
        cands = np.sort(cls.loc[cls["grades"] == grade, "schoolSourcedId"].unique().astype(object))
        if len(cands) < 2:
            continue
        cur = sub.loc[sel, "orgSourcedIds"].to_numpy(dtype=object)
        pos = np.searchsorted(cands, cur)
        hop = rng.integers(1, len(cands), size=int(sel.sum()))
        new_school[sel] = cands[(pos + hop) % len(cands)]
    sub["newSchool"] = new_school
    sub = sub[sub["newSchool"].notna()].reset_index(drop=True)
    moved = sub["sourcedId"].tolist()
    if not moved:
        return _derive(d), []

    # old student enrollments of the movers, and how many each had
    old = enr["userSourcedId"].isin(pd.Index(moved)) & (enr["role"] == "student")
    per_user = enr.loc[old, "userSourcedId"].value_counts()
    counts = per_user.reindex(sub["sourcedId"], fill_value=0).to_numpy(dtype=np.int64)

    # class block per (school, grade) in the sorted class table
    groups = cls.groupby(["schoolSourcedId", "grades"], sort=False).size().rename("size")
    groups = groups.reset_index()
    groups["start"] = np.cumsum(groups["size"].to_numpy()) - groups["size"].to_numpy()
    target = sub.merge(
        groups,
        left_on=["newSchool", "grades"],
        right_on=["schoolSourcedId", "grades"],
        how="left",
        sort=False,
    )
    size = target["size"].to_numpy(dtype=np.int64)
    first = target["start"].to_numpy(dtype=np.int64)
    take = np.minimum(counts, size)
    offset = (rng.random(len(sub)) * size).astype(np.int64)
    rep = np.repeat(np.arange(len(sub)), take)
    j = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
    cls_rows = first[rep] + (offset[rep] + j) % size[rep]
    class_sid = cls["sourcedId"].iloc[cls_rows].reset_index(drop=True)
    user_sid = sub["sourcedId"].iloc[rep].reset_index(drop=True)
    begin, end = _class_dates(d, cls["termSourcedIds"].iloc[cls_rows].reset_index(drop=True))
    new_rows = pd.DataFrame(
        {c: pd.Series("", index=range(len(rep)), dtype="str") for c in enr.columns}
    )
    new_rows["sourcedId"] = class_sid + "-" + user_sid
    new_rows["classSourcedId"] = class_sid
    new_rows["schoolSourcedId"] = sub["newSchool"].iloc[rep].reset_index(drop=True)
    new_rows["userSourcedId"] = user_sid
    new_rows["role"] = "student"
    new_rows["primary"] = "false"
    if "beginDate" in new_rows:
        new_rows["beginDate"] = begin
    if "endDate" in new_rows:
        new_rows["endDate"] = end
    new_enr = pd.concat([enr[~old.to_numpy()], new_rows], ignore_index=True)

    new_users = users.copy(deep=False)
    new_users["orgSourcedIds"] = _replace_at(
        users["orgSourcedIds"], sub["pos"].to_numpy(), sub["newSchool"].tolist()
    )
    return _derive(d, users=new_users, enrollments=new_enr), moved


def rename_users(
    d: GeneratedDistrict, fraction: float, seed: int, role: str | None = None
) -> tuple[GeneratedDistrict, list[str]]:
    """Give ``fraction`` of the users (of ``role``, or all) a new familyName and matching email."""
    rng = _rng(seed, 3)
    users = d.frames["users"]
    mask = np.ones(len(users), dtype=bool) if role is None else (users["role"] == role).to_numpy()
    chosen = _pick(mask, fraction, rng)
    if not len(chosen):
        return _derive(d), []
    old_family = users["familyName"].iloc[chosen]
    known = old_family.map(_FAMILY_INDEX).fillna(-1).to_numpy(dtype=np.int64)
    hop = rng.integers(1, len(_FAMILY), size=len(chosen))
    fresh = rng.integers(0, len(_FAMILY), size=len(chosen))
    new_idx = np.where(known >= 0, (known + hop) % len(_FAMILY), fresh)
    families = np.array(_FAMILY, dtype=object)[new_idx]
    # a family name not in our list could collide with the drawn one: shift it
    clash = families == old_family.to_numpy(dtype=object)
    families[clash] = np.array(_FAMILY, dtype=object)[(new_idx[clash] + 1) % len(_FAMILY)]
    slugs = (
        pd.Series([_ascii_slug(f) for f in _FAMILY], dtype="str")
        .iloc[new_idx]
        .reset_index(drop=True)
    )
    slugs[clash] = [_ascii_slug(f) for f in families[clash]]

    old_email = users["email"].iloc[chosen].reset_index(drop=True)
    parts = old_email.str.extract(r"^([a-z]+)\.[a-z]*?(\d+)(@.+)$")
    rebuilt = parts[0] + "." + slugs + parts[1] + parts[2]
    emails = rebuilt.where(parts[0].notna(), old_email).astype("str")

    new_users = users.copy(deep=False)
    new_users["familyName"] = _replace_at(users["familyName"], chosen, families.tolist())
    new_users["email"] = _replace_at(users["email"], chosen, emails.tolist())
    return _derive(d, users=new_users), users["sourcedId"].iloc[chosen].tolist()


def add_back(
    d: GeneratedDistrict, previous: GeneratedDistrict, sourced_ids: list[str]
) -> GeneratedDistrict:
    """Restore ``sourced_ids`` (users rows, their enrollments, demographics) from ``previous``.

    Any current rows of those users are replaced by the previous ones, so a moved or renamed user
    is restored too.  Restored rows are appended in ``previous`` order.
    """
    ids = pd.Index(sourced_ids)
    changed: dict[str, pd.DataFrame] = {}
    for kind, key in (
        ("users", "sourcedId"),
        ("enrollments", "userSourcedId"),
        ("demographics", "sourcedId"),
    ):
        if kind not in d.frames:
            continue
        cur = d.frames[kind]
        parts = [cur[~cur[key].isin(ids).to_numpy()]]
        if kind in previous.frames:
            prev = previous.frames[kind]
            parts.append(prev[prev[key].isin(ids).to_numpy()])
        changed[kind] = pd.concat(parts, ignore_index=True)
    return _derive(d, **changed)


def change_fraction(d: GeneratedDistrict, fraction: float, seed: int) -> GeneratedDistrict:
    """The benchmark's nightly "N % change": fraction/3 removed, fraction/3 moved, fraction/3 renamed."""
    share = fraction / 3
    d, _ = remove_students(d, share, seed)
    d, _ = move_students(d, share, seed)
    d, _ = rename_users(d, share, seed)
    return d


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m capti_pipeline.lib.generator",
        description="Write a synthetic OneRoster 1.1 (ClassLink-style) bulk delivery.",
    )
    parser.add_argument("--students", type=int, required=True)
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (or .zip with --zip)"
    )
    parser.add_argument("--district-id", default=DistrictSpec.district_id)
    parser.add_argument("--seed", type=int, default=DistrictSpec.seed)
    parser.add_argument("--students-per-school", type=int, default=DistrictSpec.students_per_school)
    parser.add_argument(
        "--enrollments-per-student", type=int, default=DistrictSpec.enrollments_per_student
    )
    parser.add_argument("--students-per-class", type=int, default=DistrictSpec.students_per_class)
    parser.add_argument("--higher-ed", action="store_true")
    parser.add_argument("--zip", action="store_true", help="write one zip instead of loose files")
    parser.add_argument("--bom", action="store_true", help="start every file with a UTF-8 BOM")
    parser.add_argument("--crlf", action="store_true", help="CRLF line endings")
    args = parser.parse_args(argv)

    spec = DistrictSpec(
        district_id=args.district_id,
        students=args.students,
        seed=args.seed,
        students_per_school=args.students_per_school,
        enrollments_per_student=args.enrollments_per_student,
        students_per_class=args.students_per_class,
        higher_ed=args.higher_ed,
    )
    t0 = time.perf_counter()
    district = generate_district(spec)
    t1 = time.perf_counter()
    path = write_delivery(district, args.out, as_zip=args.zip, bom=args.bom, crlf=args.crlf)
    t2 = time.perf_counter()
    counts = ", ".join(f"{k} {len(v):,}" for k, v in district.frames.items())
    sys.stdout.write(
        f"{path}\n{counts}\ngenerate {t1 - t0:.2f}s, write {t2 - t1:.2f}s, total {t2 - t0:.2f}s\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
