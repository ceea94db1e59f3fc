"""Read a landed OneRoster delivery and validate it into clean frames plus a list of issues.

File-level problems (missing file or column, bad encoding, empty required file, a manifest that
contradicts the files) refuse the whole delivery. Row-level problems reject only the affected rows;
their sourcedIds are remembered as *protected* so a rejected row can never turn into an archive.
"""

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pandera.pandas as pa

from capti_pipeline.lib import oneroster_format as fmt
from capti_pipeline.lib.issues import ERROR, WARNING, Issue, file_error, file_warning
from capti_pipeline.lib.schemas import model_for

ENTITY_FILES = {
    "orgs": "orgs.csv",
    "users": "users.csv",
    "roles": "roles.csv",
    "classes": "classes.csv",
    "enrollments": "enrollments.csv",
    "academicSessions": "academicSessions.csv",
    "courses": "courses.csv",
}
FILE_ENTITIES = {file: entity for entity, file in ENTITY_FILES.items()}

# Columns kept after reading; everything else (password, phone, sms, ...) is dropped at once so it
# is never staged, stored or logged.
KEEP_COLUMNS = {
    "orgs.csv": ("sourcedId", "status", "name", "type", "parentSourcedId"),
    "users.csv": (
        "sourcedId",
        "status",
        "enabledUser",
        "orgSourcedIds",
        "role",
        "username",
        "givenName",
        "familyName",
        "identifier",
        "email",
        "grades",
    ),
    "roles.csv": ("sourcedId", "status", "userSourcedId", "roleType", "role", "orgSourcedId"),
    "classes.csv": ("sourcedId", "status", "title", "classType", "schoolSourcedId"),
    "enrollments.csv": (
        "sourcedId",
        "status",
        "classSourcedId",
        "schoolSourcedId",
        "userSourcedId",
        "role",
        "primary",
    ),
    "academicSessions.csv": ("sourcedId", "status", "title", "type"),
    "courses.csv": ("sourcedId", "status", "title"),
}

# Vocabulary columns canonicalised case-insensitively before validation.
_VOCABULARIES: dict[str, dict[str, tuple[str, ...]]] = {
    "orgs.csv": {"type": fmt.ORG_TYPES},
    "users.csv": {"role": fmt.USER_ROLES_11, "enabledUser": fmt.BOOLEANS},
    "roles.csv": {"role": fmt.USER_ROLES_12, "roleType": fmt.ROLE_TYPES},
    "classes.csv": {"classType": fmt.CLASS_TYPES},
    "enrollments.csv": {"role": fmt.ENROLLMENT_ROLES, "primary": fmt.BOOLEANS},
}


@dataclass
class KnownRecords:
    """What the live store already knows, for references in delta or partial deliveries."""

    org_types: dict[str, str] = field(default_factory=dict)
    users: set[str] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)


@dataclass
class ValidatedDelivery:
    version: str
    modes: dict[str, str]
    frames: dict[str, pd.DataFrame]
    protected: dict[str, set[str]]
    issues: list[Issue]
    rows_read: dict[str, int]

    @property
    def refused(self) -> bool:
        return any(i.severity == ERROR and i.line == 0 for i in self.issues)

    @property
    def file_errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == ERROR and i.line == 0]

    def row_errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == ERROR and i.line > 0]


class _Refused(Exception):
    pass


def _line(index: int) -> int:
    """CSV line number of a frame row: the header is line 1 and rows keep their read position."""
    return int(index) + 2


def find_files(directory: Path) -> tuple[dict[str, Path], list[Issue]]:
    found: dict[str, Path] = {}
    issues: list[Issue] = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        canonical = fmt.KNOWN_FILES.get(path.name.lower())
        if canonical is None:
            if path.suffix.lower() == ".csv":
                issues.append(file_warning(path.name, "not a OneRoster rostering file; ignored"))
            continue
        if canonical != path.name:
            issues.append(file_warning(path.name, f"file name should be {canonical}; accepted"))
        if canonical in found:
            raise _RefusedWith(
                [file_error(path.name, f"delivered twice (as {found[canonical].name} too)")]
            )
        found[canonical] = path
    return found, issues


class _RefusedWith(Exception):
    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__(issues)


def read_manifest(path: Path) -> tuple[dict[str, str], list[Issue]]:
    issues: list[Issue] = []
    text = _decode(path)
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0][:2]] != ["propertyName", "value"]:
        raise _RefusedWith([file_error(MANIFEST, "header must be 'propertyName,value'")])
    props: dict[str, str] = {}
    for offset, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        name = row[0].strip()
        value = row[1].strip() if len(row) > 1 else ""
        if name in props:
            issues.append(Issue(WARNING, MANIFEST, offset, "propertyName", "", f"{name} repeated"))
        props[name] = value
    return props, issues


MANIFEST = fmt.MANIFEST


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _RefusedWith(
            [
                file_error(
                    path.name,
                    f"not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); "
                    "the file must be saved as UTF-8",
                )
            ]
        ) from exc


def _manifest_modes(
    props: dict[str, str] | None, present: dict[str, Path], issues: list[Issue]
) -> tuple[str | None, dict[str, str]]:
    modes: dict[str, str] = {}
    version: str | None = None
    errors: list[Issue] = []
    if props is None:
        issues.append(
            file_warning(MANIFEST, "no manifest.csv; every delivered file is treated as bulk")
        )
        return None, {name: "bulk" for name in present}
    manifest_version = props.get("manifest.version", "")
    if manifest_version not in ("1", "1.0"):
        errors.append(
            file_error(
                MANIFEST, f"manifest.version must be 1.0 (got {manifest_version!r})", "value"
            )
        )
    raw_version = props.get("oneroster.version", "")
    if raw_version in ("1.1",):
        version = "1.1"
    elif raw_version in ("1.2", "1.2.1"):
        version = "1.2"
    else:
        errors.append(
            file_error(
                MANIFEST, f"oneroster.version must be 1.1 or 1.2 (got {raw_version!r})", "value"
            )
        )
    for file in fmt.ROSTER_FILES:
        key = "file." + file.removesuffix(".csv")
        value = props.get(key)
        if value is None or value == "":
            mode = "bulk" if file in present else "absent"
            if value == "":
                issues.append(
                    file_warning(MANIFEST, f"{key} has no value; taken as {mode}", "value")
                )
        elif value in fmt.MODES:
            mode = value
        else:
            errors.append(
                file_error(
                    MANIFEST, f"{key} must be bulk, delta or absent (got {value!r})", "value"
                )
            )
            continue
        if mode != "absent" and file not in present:
            errors.append(file_error(file, f"manifest declares {key}={mode} but the file is missing"))
        elif mode == "absent" and file in present and file in fmt.REQUIRED_FILES + ("roles.csv",):
            errors.append(
                file_error(file, f"file delivered but the manifest declares {key}=absent")
            )
        modes[file] = mode
    if errors:
        raise _RefusedWith(errors)
    return version, modes


def _read_csv(path: Path, canonical: str, issues: list[Issue]) -> pd.DataFrame:
    text = _decode(path)
    if not text.strip():
        raise _RefusedWith([file_error(canonical, "file is empty (no header row)")])
    if not text.endswith(("\n", "\r")):
        issues.append(file_warning(canonical, "no newline at end of file; accepted"))
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            engine="c",
        )
    except pd.errors.ParserError:
        frame = _read_ragged(text, canonical, issues)
    frame = frame.fillna("")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _read_ragged(text: str, canonical: str, issues: list[Issue]) -> pd.DataFrame:
    """Slow path for rows with more cells than the header: trailing empty cells are tolerated."""
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0]
    width = len(header)
    body: list[list[str]] = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) > width:
            extra = row[width:]
            if any(cell.strip() for cell in extra):
                raise _RefusedWith(
                    [
                        file_error(
                            canonical,
                            f"line {number} has {len(row)} cells but the header has {width}; "
                            "the extra cells are not empty",
                        )
                    ]
                )
            issues.append(
                Issue(
                    WARNING,
                    canonical,
                    number,
                    "",
                    row[0] if row else "",
                    f"{len(row) - width} extra empty cell(s) at the end of the row; ignored",
                )
            )
            row = row[:width]
        elif len(row) < width:
            row = row + [""] * (width - len(row))
        body.append(row)
    return pd.DataFrame(body, columns=header, dtype="str")


def _check_header(
    frame: pd.DataFrame, canonical: str, version: str, issues: list[Issue]
) -> pd.DataFrame:
    columns = list(frame.columns)
    duplicates = sorted({c for c in columns if columns.count(c) > 1 and c})
    if duplicates:
        raise _RefusedWith(
            [file_error(canonical, f"duplicate column(s): {', '.join(duplicates)}")]
        )
    unnamed = [c for c in columns if c == "" or c.startswith("Unnamed:")]
    if unnamed:
        issues.append(file_warning(canonical, f"{len(unnamed)} column(s) without a header; ignored"))
        frame = frame.drop(columns=unnamed)
    expected = fmt.HEADERS[(version, canonical)]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise _RefusedWith(
            [
                file_error(
                    canonical,
                    f"missing required column(s) for OneRoster {version}: {', '.join(missing)}",
                    ",".join(missing),
                )
            ]
        )
    unknown = [c for c in frame.columns if c not in expected and not c.startswith("metadata.")]
    if unknown:
        issues.append(
            file_warning(canonical, f"unknown column(s) ignored: {', '.join(unknown)}")
        )
    keep = [c for c in KEEP_COLUMNS.get(canonical, expected) if c in frame.columns]
    return frame[keep]


def _detect_version(users: pd.DataFrame | None, declared: str | None) -> str:
    if users is None:
        return declared or "1.1"
    header_version = "1.1" if {"role", "orgSourcedIds"} <= set(users.columns) else "1.2"
    if declared and declared != header_version:
        raise _RefusedWith(
            [
                file_error(
                    "users.csv",
                    f"manifest says OneRoster {declared} but the users.csv header is "
                    f"OneRoster {header_version} ("
                    + ("has role/orgSourcedIds" if header_version == "1.1" else "no role column")
                    + ")",
                    "role",
                )
            ]
        )
    return header_version


def canonicalise(frame: pd.DataFrame, canonical: str, issues: list[Issue]) -> pd.DataFrame:
    """Trim vocabulary columns and map case variants (TRUE, Scheduled) onto spec tokens."""
    frame = frame.copy()
    if "status" in frame.columns:
        status = frame["status"].str.strip().str.lower()
        legacy = status.eq("inactive")
        if legacy.any():
            issues.append(
                file_warning(
                    canonical,
                    f"{int(legacy.sum())} row(s) with legacy status 'inactive' read as 'tobedeleted'",
                    "status",
                )
            )
            status = status.where(~legacy, "tobedeleted")
        frame["status"] = status
    for column, vocabulary in _VOCABULARIES.get(canonical, {}).items():
        if column not in frame.columns:
            continue
        lookup = {token.lower(): token for token in vocabulary}
        raw = frame[column]
        lowered = raw.str.strip().str.lower()
        mapped = lowered.map(lookup)
        frame[column] = mapped.where(mapped.notna(), raw).astype("str")
    if "grades" in frame.columns:
        grades = frame["grades"]
        needs = grades.ne("") & ~grades.isin(fmt.GRADE_CODES)
        if needs.any():
            frame.loc[needs, "grades"] = grades[needs].map(_canonical_grades)
    return frame


def _canonical_grades(value: str) -> str:
    items = [item.strip() for item in value.split(",")]
    return ",".join(fmt.GRADE_ALIASES.get(item, item) for item in items)


def _schema_failures(
    frame: pd.DataFrame, canonical: str, version: str
) -> tuple[list[Issue], set[int]]:
    model = model_for(version, canonical)
    if model is None:
        return [], set()
    try:
        model.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    else:
        return [], set()
    issues: list[Issue] = []
    bad_rows: set[int] = set()
    ids = frame["sourcedId"] if "sourcedId" in frame.columns else None
    for case in cases.itertuples(index=False):
        index = case.index
        column = str(case.column) if case.column is not None else ""
        check = str(case.check)
        if index is None or pd.isna(index):
            if case.schema_context == "DataFrameSchema" and check.startswith("column_in"):
                continue
            issues.append(file_error(canonical, f"{column}: {check}", column))
            continue
        index = int(index)
        bad_rows.add(index)
        message = _message_for(check, column, case.failure_case)
        sourced = str(ids.iloc[index]) if ids is not None else ""
        if column == "sourcedId" or "," in column:
            column = column.strip("()").replace("'", "")
        issues.append(Issue(ERROR, canonical, _line(index), column, sourced, message))
    return issues, bad_rows


def _message_for(check: str, column: str, value: object) -> str:
    show = column in fmt.REPORTABLE_VALUE_COLUMNS
    if check == "field_uniqueness":
        return f"duplicate {column} {value!s}; every row with it is rejected"
    if check == "multiple_fields_uniqueness":
        return "duplicate enrollment of the same user in the same class with the same role"
    if check.startswith("str_length"):
        return f"required value missing in {column}"
    if show and value not in (None, ""):
        return f"{check} (got {value!s})"
    return check


def _reject_references(
    frame: pd.DataFrame,
    canonical: str,
    column: str,
    valid: set[str] | pd.Index,
    target: str,
    issues: list[Issue],
    *,
    multi: bool = False,
) -> pd.Series:
    """Mask of rows whose reference(s) in `column` point at nothing we know."""
    values = frame[column]
    if not multi:
        bad = ~values.isin(valid) & values.ne("")
        for index, sourced, ref in zip(
            frame.index[bad], frame["sourcedId"][bad], values[bad], strict=True
        ):
            issues.append(
                Issue(
                    ERROR,
                    canonical,
                    _line(index),
                    column,
                    sourced,
                    f"references unknown {target} {ref}",
                )
            )
        return bad
    single = ~values.str.contains(",", regex=False)
    bad = pd.Series(False, index=frame.index)
    bad[single] = ~values[single].isin(valid) & values[single].ne("")
    multi_rows = values[~single]
    for index, value in multi_rows.items():
        unknown = [item.strip() for item in value.split(",") if item.strip() not in valid]
        if unknown:
            bad[index] = True
    for index in frame.index[bad]:
        value = values[index]
        unknown = [item.strip() for item in value.split(",") if item.strip() not in valid]
        issues.append(
            Issue(
                ERROR,
                canonical,
                _line(index),
                column,
                frame.at[index, "sourcedId"],
                f"references unknown {target} {', '.join(unknown)}",
            )
        )
    return bad


def validate_delivery(directory: Path, known: KnownRecords | None = None) -> ValidatedDelivery:
    """Read every rostering file in `directory`; never raises for a district's bad file."""
    known = known or KnownRecords()
    issues: list[Issue] = []
    try:
        return _validate(directory, known, issues)
    except _RefusedWith as refused:
        issues.extend(refused.issues)
        return ValidatedDelivery("", {}, {}, {}, issues, {})


def _validate(directory: Path, known: KnownRecords, issues: list[Issue]) -> ValidatedDelivery:
    present, found_issues = find_files(directory)
    issues.extend(found_issues)
    props = None
    if MANIFEST in present:
        props, manifest_issues = read_manifest(present[MANIFEST])
        issues.extend(manifest_issues)
    declared, modes = _manifest_modes(props, present, issues)
    missing = [f for f in fmt.REQUIRED_FILES if modes.get(f, "absent") == "absent"]
    if props is None and missing:
        raise _RefusedWith([file_error(f, "required file is missing") for f in missing])

    raw: dict[str, pd.DataFrame] = {}
    refusals: list[Issue] = []
    for file in fmt.ROSTER_FILES:
        if modes.get(file, "absent") == "absent" or file not in ENTITY_FILES.values():
            continue
        try:
            raw[file] = _read_csv(present[file], file, issues)
        except _RefusedWith as refused:
            refusals.extend(refused.issues)
    if refusals:
        raise _RefusedWith(refusals)
    version = _detect_version(raw.get("users.csv"), declared)
    if version == "1.2" and modes.get("users.csv", "absent") != "absent":
        if modes.get("roles.csv", "absent") == "absent":
            raise _RefusedWith(
                [file_error("roles.csv", "OneRoster 1.2 delivery without roles.csv")]
            )

    frames: dict[str, pd.DataFrame] = {}
    rows_read: dict[str, int] = {}
    for file, frame in raw.items():
        try:
            frame = _check_header(frame, file, version, issues)
        except _RefusedWith as refused:
            refusals.extend(refused.issues)
            continue
        blank = frame.eq("").all(axis=1)
        if blank.any():
            for index in frame.index[blank]:
                issues.append(Issue(WARNING, file, _line(index), "", "", "blank line ignored"))
            frame = frame[~blank]
        rows_read[file] = len(frame)
        if frame.empty and modes[file] == "bulk" and file in fmt.REQUIRED_FILES + ("roles.csv",):
            refusals.append(
                file_error(
                    file,
                    "bulk file has a header but no rows; a bulk file must hold the complete set "
                    "(declare it absent in manifest.csv to leave it untouched)",
                )
            )
            continue
        if modes[file] == "delta":
            frame = frame.copy()
        frames[file] = canonicalise(frame, file, issues)
    if refusals:
        raise _RefusedWith(refusals)

    protected: dict[str, set[str]] = {entity: set() for entity in ENTITY_FILES}
    clean: dict[str, pd.DataFrame] = {}
    for file, frame in frames.items():
        failures, bad = _schema_failures(frame, file, version)
        if modes[file] == "delta":
            blank_status = frame["status"].eq("")
            for index in frame.index[blank_status]:
                failures.append(
                    Issue(
                        ERROR,
                        file,
                        _line(index),
                        "status",
                        frame.at[index, "sourcedId"],
                        "status is required in a delta file (active or tobedeleted)",
                    )
                )
                bad.add(int(index))
        issues.extend(failures)
        entity = FILE_ENTITIES[file]
        if bad:
            rejected = frame.loc[sorted(bad)]
            protected[entity].update(s for s in rejected["sourcedId"] if s)
            frame = frame.drop(index=sorted(bad))
        clean[entity] = frame

    _check_references(clean, modes, known, protected, issues)
    return ValidatedDelivery(version, modes, clean, protected, issues, rows_read)


def _reference_pool(
    clean: dict[str, pd.DataFrame],
    entity: str,
    modes: dict[str, str],
    known: Iterable[str],
) -> set[str]:
    """Ids a reference may point at: the delivered rows, plus the store's for delta/absent files."""
    pool: set[str] = set()
    frame = clean.get(entity)
    if frame is not None:
        pool.update(frame["sourcedId"][frame["status"].ne("tobedeleted")])
    if modes.get(ENTITY_FILES[entity], "absent") != "bulk":
        pool.update(known)
    return pool


def _check_references(
    clean: dict[str, pd.DataFrame],
    modes: dict[str, str],
    known: KnownRecords,
    protected: dict[str, set[str]],
    issues: list[Issue],
) -> None:
    def drop(entity: str, mask: pd.Series) -> None:
        if mask.any():
            frame = clean[entity]
            protected[entity].update(frame["sourcedId"][mask])
            clean[entity] = frame[~mask]

    org_ids = _reference_pool(clean, "orgs", modes, known.org_types)
    # A reference to a row rejected for its own errors is reported as such, not as "unknown".
    if "users" in clean:
        users = clean["users"]
        if "orgSourcedIds" in users.columns:
            drop("users", _reject_references(users, "users.csv", "orgSourcedIds", org_ids, "org", issues, multi=True))
    user_ids = _reference_pool(clean, "users", modes, known.users)
    if "roles" in clean:
        roles = clean["roles"]
        bad = _reject_references(roles, "roles.csv", "userSourcedId", user_ids, "user", issues)
        bad |= _reject_references(roles, "roles.csv", "orgSourcedId", org_ids, "org", issues)
        drop("roles", bad)
    if "classes" in clean:
        org_types = dict(known.org_types)
        if "orgs" in clean:
            org_types.update(zip(clean["orgs"]["sourcedId"], clean["orgs"]["type"], strict=True))
        schools = {o for o, t in org_types.items() if t == "school"} & org_ids
        classes = clean["classes"]
        not_school = classes["schoolSourcedId"].isin(org_ids) & ~classes["schoolSourcedId"].isin(schools)
        for index in classes.index[not_school]:
            org = classes.at[index, "schoolSourcedId"]
            issues.append(
                Issue(
                    ERROR,
                    "classes.csv",
                    _line(index),
                    "schoolSourcedId",
                    classes.at[index, "sourcedId"],
                    f"schoolSourcedId {org} is an org of type {org_types.get(org)}, not a school",
                )
            )
        bad = _reject_references(
            classes[~not_school], "classes.csv", "schoolSourcedId", org_ids, "org", issues
        )
        mask = not_school.copy()
        mask[bad.index] = bad
        drop("classes", mask)
    class_ids = _reference_pool(clean, "classes", modes, known.classes)
    if "enrollments" in clean:
        enrollments = clean["enrollments"]
        rejected_users = protected["users"]
        rejected_classes = protected["classes"]
        cascade = enrollments["userSourcedId"].isin(rejected_users) | enrollments[
            "classSourcedId"
        ].isin(rejected_classes)
        for index in enrollments.index[cascade]:
            issues.append(
                Issue(
                    WARNING,
                    "enrollments.csv",
                    _line(index),
                    "userSourcedId",
                    enrollments.at[index, "sourcedId"],
                    "skipped: its user or class row was rejected; the enrollment is left as it is",
                )
            )
        drop("enrollments", cascade)
        enrollments = clean["enrollments"]
        live = enrollments["status"].ne("tobedeleted")
        bad = _reject_references(enrollments[live], "enrollments.csv", "classSourcedId", class_ids, "class", issues)
        bad_user = _reject_references(enrollments[live], "enrollments.csv", "userSourcedId", user_ids, "user", issues)
        mask = pd.Series(False, index=enrollments.index)
        mask[bad.index] = bad | bad_user
        drop("enrollments", mask)
