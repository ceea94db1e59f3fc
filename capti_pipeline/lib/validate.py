"""Read a landed OneRoster delivery and validate it into clean frames plus a list of issues.

File-level problems (missing file or column, bad encoding, empty required file, a manifest that
contradicts the files) refuse the whole delivery. Row-level problems reject only the affected rows;
their sourcedIds are remembered as *protected* so a rejected row can never turn into an archive.

Every frame is indexed by CSV line number - 2 (the header is line 1), so an issue's line is
`index + 2` wherever it is raised, even after blank or rejected rows are dropped.
"""

import codecs
import csv
import difflib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as arrow
import pyarrow.csv as arrow_csv

from capti_pipeline.lib import oneroster_format as fmt
from capti_pipeline.lib.fastops import isin, map_distinct
from capti_pipeline.lib.issues import ERROR, WARNING, Issue, file_error, file_warning
from capti_pipeline.lib.schemas import ID_PATTERN, UNIQUE_ID, model_for

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
MANIFEST = fmt.MANIFEST
ROLES = "roles.csv"
# Files whose bulk form must hold rows and which may not be delivered against an `absent` manifest.
_CORE_FILES = (*fmt.REQUIRED_FILES, ROLES)

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

# Columns checked here that Capti's roster does not use: dropped from the validated frames (an
# enrollment's school is its class's; millions of rows need not carry it to the next step).
_CHECKED_ONLY = {"enrollments": ("schoolSourcedId", "primary")}

# Vocabulary columns canonicalised case-insensitively before validation.
_VOCABULARIES: dict[str, dict[str, tuple[str, ...]]] = {
    "orgs.csv": {"type": fmt.ORG_TYPES},
    "users.csv": {"role": fmt.USER_ROLES_11, "enabledUser": fmt.BOOLEANS},
    "roles.csv": {"role": fmt.USER_ROLES_12, "roleType": fmt.ROLE_TYPES},
    "classes.csv": {"classType": fmt.CLASS_TYPES},
    "enrollments.csv": {"role": fmt.ENROLLMENT_ROLES, "primary": fmt.BOOLEANS},
}

# Per file and kind of tolerated oddity, this many rows are listed one by one, then summarised.
_MAX_ROW_NOTES = 20
_ID = re.compile(ID_PATTERN)


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


class _RefusedWith(Exception):
    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__(issues)


def _line(index: int) -> int:
    """CSV line number of a frame row (frames are indexed by line - 2)."""
    return int(index) + 2


# ------------------------------------------------------------------------------------------------
# Files and manifest
# ------------------------------------------------------------------------------------------------


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


def read_manifest(path: Path) -> tuple[dict[str, str], list[Issue]]:
    """manifest.csv as {propertyName: value}; names are matched case-insensitively later."""
    issues: list[Issue] = []
    text = _decode(path.read_bytes(), MANIFEST)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise _RefusedWith([file_error(MANIFEST, f"not a readable CSV file ({exc})")]) from exc
    header = [c.strip().lower() for c in rows[0][:2]] if rows else []
    if header != [c.lower() for c in fmt.MANIFEST_HEADER]:
        raise _RefusedWith([file_error(MANIFEST, "header must be 'propertyName,value'")])
    props: dict[str, str] = {}
    seen: dict[str, tuple[str, int]] = {}
    errors: list[Issue] = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        name = row[0].strip()
        value = row[1].strip() if len(row) > 1 else ""
        key = name.lower()
        if key in seen:
            first_value, first_line = seen[key]
            if first_value.lower() != value.lower():
                errors.append(
                    file_error(
                        MANIFEST,
                        f"{name} is given twice with different values ({first_value!r} on line "
                        f"{first_line}, {value!r} on line {number})",
                        "value",
                    )
                )
            else:
                issues.append(
                    Issue(WARNING, MANIFEST, number, "propertyName", "", f"{name} repeated")
                )
            continue
        seen[key] = (value, number)
        props[name] = value
    if errors:
        raise _RefusedWith(errors)
    return props, issues


def _check_encoding(data: bytes, name: str) -> None:
    """Refuse what is not UTF-8 text; an ASCII file (most deliveries) needs no decoding."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data:
        _decode(data, name)  # raises with the precise message
    if not data.isascii():
        _decode(data, name)


def _decode(data: bytes, name: str) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise _RefusedWith(
            [file_error(name, "the file is UTF-16 encoded; it must be saved as UTF-8")]
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _RefusedWith(
            [
                file_error(
                    name,
                    f"not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); "
                    "the file must be saved as UTF-8",
                )
            ]
        ) from exc
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise _RefusedWith(
            [
                file_error(
                    name,
                    f"contains NUL bytes (line {line}): not a UTF-8 text file (UTF-16 without a "
                    "byte order mark?); the file must be saved as UTF-8",
                )
            ]
        )
    return text


def _manifest_modes(
    props: dict[str, str] | None, present: dict[str, Path], issues: list[Issue]
) -> tuple[str | None, dict[str, str]]:
    """The declared OneRoster version (None when unstated) and a mode per rostering file."""
    if props is None:
        issues.append(
            file_warning(MANIFEST, "no manifest.csv; every delivered file is treated as bulk")
        )
        return None, {name: "bulk" if name in present else "absent" for name in fmt.ROSTER_FILES}
    lower = {name.lower(): value for name, value in props.items()}
    errors: list[Issue] = []
    manifest_version = lower.get("manifest.version", "")
    if manifest_version == "":
        issues.append(file_warning(MANIFEST, "manifest.version missing; read as 1.0", "value"))
    elif manifest_version not in fmt.MANIFEST_VERSIONS:
        errors.append(
            file_error(
                MANIFEST, f"manifest.version must be 1.0 (got {manifest_version!r})", "value"
            )
        )
    raw_version = lower.get("oneroster.version", "")
    version = fmt.ONEROSTER_VERSIONS.get(raw_version)
    if raw_version == "":
        issues.append(
            file_warning(
                MANIFEST,
                "oneroster.version missing; the version is taken from the users.csv header",
                "value",
            )
        )
    elif version is None:
        errors.append(
            file_error(
                MANIFEST, f"oneroster.version must be 1.1 or 1.2 (got {raw_version!r})", "value"
            )
        )
    modes: dict[str, str] = {}
    for file in fmt.ROSTER_FILES:
        key = "file." + file.removesuffix(".csv")
        value = lower.get(key.lower())
        delivered = file in present
        if value is None or value == "":
            mode = "bulk" if delivered else "absent"
            if value == "" or delivered:
                what = "has no value" if value == "" else "is not listed"
                issues.append(file_warning(MANIFEST, f"{key} {what}; taken as {mode}", "value"))
            elif file in fmt.REQUIRED_FILES:
                errors.append(
                    file_error(
                        file,
                        f"required file is missing (and manifest.csv does not declare {key})",
                    )
                )
                continue
        elif value.lower() in fmt.MODES:
            mode = value.lower()
        else:
            errors.append(
                file_error(
                    MANIFEST, f"{key} must be bulk, delta or absent (got {value!r})", "value"
                )
            )
            continue
        if mode != "absent" and not delivered:
            errors.append(
                file_error(file, f"manifest declares {key}={mode} but the file is missing")
            )
        elif mode == "absent" and delivered:
            if file in _CORE_FILES:
                errors.append(
                    file_error(file, f"file delivered but the manifest declares {key}=absent")
                )
            else:
                issues.append(
                    file_warning(
                        file, f"file delivered but the manifest declares {key}=absent; ignored"
                    )
                )
        modes[file] = mode
    if errors:
        raise _RefusedWith(errors)
    return version, modes


# ------------------------------------------------------------------------------------------------
# Reading one CSV file
# ------------------------------------------------------------------------------------------------


@dataclass
class _RawFile:
    """One file as text cells: `frame` is indexed by line - 2; `rejected` holds rows whose cells
    could not be aligned with the header (line → {column: cell})."""

    frame: pd.DataFrame
    rejected: dict[int, dict[str, str]]


@dataclass
class _RowNotes:
    ragged: list[tuple[int, int, str]] = field(default_factory=list)  # (line, extra cells, id)
    short: list[tuple[int, int, str]] = field(default_factory=list)  # (line, cells, id)
    misaligned: list[tuple[int, int, dict[str, str]]] = field(default_factory=list)


def _fit_row(
    cells: list[str], header: list[str], line: int, id_pos: int | None, notes: _RowNotes
) -> list[str] | None:
    """Cells aligned with the header: extra EMPTY trailing cells are dropped, missing trailing
    cells read as empty; extra non-empty cells mean the row cannot be trusted (None)."""
    width = len(header)
    if not cells or (len(cells) == 1 and cells[0] == ""):
        return [""] * width  # blank line, reported as such later
    sourced = cells[id_pos] if id_pos is not None and id_pos < len(cells) else ""
    if len(cells) > width:
        if any(cell.strip() for cell in cells[width:]):
            notes.misaligned.append((line, len(cells), dict(zip(header, cells, strict=False))))
            return None
        notes.ragged.append((line, len(cells) - width, sourced))
        return cells[:width]
    if len(cells) < width:
        # Trailing header cells without a name are ignored anyway: a row may stop before them.
        if len(cells) < len(_named_prefix(header)):
            notes.short.append((line, len(cells), sourced))
        return cells + [""] * (width - len(cells))
    return cells


def _named_prefix(header: list[str]) -> list[str]:
    end = len(header)
    while end and not header[end - 1]:
        end -= 1
    return header[:end]


def _physical_lines(data: bytes) -> int | None:
    """Line count as the CSV reader sees it, or None for bare-CR line breaks (slow path).
    (Counting bytes is exact for UTF-8: no multi-byte sequence contains CR or LF.)"""
    carriage = data.count(b"\r")
    if carriage and carriage != data.count(b"\r\n"):
        return None
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def _arrow_read(
    body: memoryview, names: list[str], *, threads: bool
) -> tuple[arrow.Table, list[tuple[int | None, str]]]:
    invalid: list[tuple[int | None, str]] = []

    def on_invalid(row: arrow_csv.InvalidRow) -> str:
        invalid.append((row.number, row.text))
        return "skip"

    table = arrow_csv.read_csv(
        arrow.BufferReader(arrow.py_buffer(body)),
        read_options=arrow_csv.ReadOptions(
            column_names=names, skip_rows=1, use_threads=threads, block_size=1 << 24
        ),
        parse_options=arrow_csv.ParseOptions(
            newlines_in_values=True, ignore_empty_lines=False, invalid_row_handler=on_invalid
        ),
        convert_options=arrow_csv.ConvertOptions(
            # large_string: pandas' `str` dtype holds it as is (no copy into pandas).
            column_types=dict.fromkeys(names, arrow.large_string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    return table, invalid


def _read_fast(
    data: bytes, header: list[str], id_pos: int | None, notes: _RowNotes
) -> tuple[pd.DataFrame, dict[int, list[str]]] | None:
    """pyarrow parse (fast, exact column counts); None when line numbers cannot be trusted,
    e.g. a quoted value spans lines."""
    # Without quotes or carriage returns every line is one record: no need to count them.
    plain = b'"' not in data and b"\r" not in data
    lines = None if plain else _physical_lines(data)
    if lines is None and not plain:
        return None
    names = [f"c{i}" for i in range(len(header))]
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    body = memoryview(data)[start:]
    try:
        # Parallel first; only a file with odd rows is parsed again on one thread, which is what
        # reports those rows' line numbers.
        table, invalid = _arrow_read(body, names, threads=True)
        if invalid:
            table, invalid = _arrow_read(body, names, threads=False)
    except (arrow.ArrowException, ValueError):
        return None
    numbers = [number for number, _ in invalid]
    if lines is None:
        lines = len(table) + len(invalid) + 1
    if len(table) + len(invalid) != lines - 1 or any(
        number is None or not 2 <= number <= lines for number in numbers
    ):
        return None
    if len(set(numbers)) != len(numbers):
        return None
    frame = table.to_pandas()
    frame.columns = header
    if invalid:
        bad_lines = np.array(sorted(int(number or 0) for number in numbers), dtype=int)
        frame.index = pd.Index(np.delete(np.arange(0, lines - 1), bad_lines - 2))
    odd: dict[int, list[str]] = {}
    for number, row_text in invalid:
        cells = next(csv.reader([row_text.rstrip("\r\n")]), [])
        fitted = _fit_row(cells, header, int(number or 0), id_pos, notes)
        if fitted is not None:
            odd[int(number or 0)] = fitted
    return frame, odd


def _read_slow(
    text: str, canonical: str, header: list[str], id_pos: int | None, notes: _RowNotes
) -> dict[int, list[str]]:
    """Python csv parse that tracks the line each record starts on (values spanning lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: dict[int, list[str]] = {}
    last = 0  # line the previous record ended on: a broken record starts on the next one
    try:
        next(reader)
        last = reader.line_num
        for cells in reader:
            fitted = _fit_row(cells, header, last + 1, id_pos, notes)
            if fitted is not None:
                rows[last + 1] = fitted
            last = reader.line_num
    except csv.Error as exc:
        raise _RefusedWith(
            [
                file_error(
                    canonical,
                    f"line {last + 1}: the CSV quoting is broken ({exc}); a quote inside a "
                    "value must be doubled and every quoted value closed",
                )
            ]
        ) from exc
    return rows


def _read_csv(path: Path, canonical: str, issues: list[Issue]) -> _RawFile:
    data = path.read_bytes()
    _check_encoding(data, canonical)
    if re.search(rb"[^\s\xef\xbb\xbf]", data) is None:  # nothing but blanks (and a BOM)
        raise _RefusedWith([file_error(canonical, "file is empty (no header row)")])
    if not data.endswith((b"\n", b"\r")):
        issues.append(file_warning(canonical, "no newline at end of file; accepted"))
    head = data[: 1 << 16].decode("utf-8-sig", errors="ignore")
    head_reader = csv.reader(io.StringIO(head, newline=""))
    header = [cell.strip() for cell in next(head_reader)]
    if not any(header):
        raise _RefusedWith(
            [file_error(canonical, "line 1 is blank: the header row must be the first line")]
        )
    id_pos = next((i for i, c in enumerate(header) if c.lower() == "sourcedid"), None)
    notes = _RowNotes()
    fast = _read_fast(data, header, id_pos, notes) if head_reader.line_num == 1 else None
    if fast is not None:
        frame, odd = fast
    else:
        notes = _RowNotes()
        frame = pd.DataFrame(columns=header, dtype="str")
        odd = _read_slow(_decode(data, canonical), canonical, header, id_pos, notes)
    if odd:
        extra = pd.DataFrame(
            list(odd.values()), columns=header, index=[n - 2 for n in odd], dtype="str"
        )
        frame = pd.concat([frame, extra]).sort_index() if len(frame) else extra
        frame = frame.fillna("").astype("str")
    _note_rows(canonical, header, notes, issues)
    rejected = {line: cells for line, _, cells in notes.misaligned}
    return _RawFile(frame, rejected)


def _note_rows(canonical: str, header: list[str], notes: _RowNotes, issues: list[Issue]) -> None:
    width, named = len(header), len(_named_prefix(header))
    for line, count, cells in notes.misaligned:
        issues.append(
            Issue(
                ERROR,
                canonical,
                line,
                "",
                _shown_id(_cell(cells, "sourcedId")),
                f"row has {count} cells but the header has {width} and the extra cells are not "
                "empty (an unquoted comma in a value?); row rejected",
            )
        )
    short = f"row has {{n}} cells but the header has {named}; the missing cells are read as empty"
    for kind, rows, message in (
        ("ragged", notes.ragged, "{n} extra empty cell(s) at the end of the row; ignored"),
        ("short", notes.short, short),
    ):
        for line, n, sourced in rows[:_MAX_ROW_NOTES]:
            issues.append(
                Issue(WARNING, canonical, line, "", _shown_id(sourced), message.format(n=n))
            )
        if len(rows) > _MAX_ROW_NOTES:
            rest = len(rows) - _MAX_ROW_NOTES
            what = "with extra empty cells" if kind == "ragged" else "shorter than the header"
            issues.append(
                file_warning(canonical, f"{rest} more row(s) {what} (first listed above); accepted")
            )


def _cell(cells: dict[str, str], name: str) -> str:
    """A cell of a row kept as {header: cell}, matching the header name case-insensitively."""
    if name in cells:
        return cells[name]
    return next((v for k, v in cells.items() if k.lower() == name.lower()), "")


def _protected_forms(value: str) -> set[str]:
    """The ids a rejected row protects from archiving: as written and trimmed (a row rejected
    for `" 0500"` must still protect the stored account 0500)."""
    return {v for v in (value, value.strip()) if v}


def _shown_id(value: str) -> str:
    """A sourcedId for the report only when it looks like one (a misaligned row may hold a name)."""
    return value if _ID.match(value or "") and len(value) <= 255 else ""


# ------------------------------------------------------------------------------------------------
# Headers and version
# ------------------------------------------------------------------------------------------------


def _check_header(
    frame: pd.DataFrame, canonical: str, version: str, issues: list[Issue]
) -> pd.DataFrame:
    columns = [str(c) for c in frame.columns]
    named = [c for c in columns if c]
    expected = fmt.HEADERS[(version, canonical)]
    by_lower = {name.lower(): name for name in expected}
    found = {by_lower[c.lower()] for c in named if c.lower() in by_lower}
    if len(found) * 2 < len(expected):
        # Most likely a data row where the header should be: never echo its cells (names).
        missing = [c for c in expected if c not in found]
        raise _RefusedWith(
            [
                file_error(
                    canonical,
                    f"the first line is not a OneRoster {version} header: {len(missing)} of "
                    f"{len(expected)} required columns are missing ({', '.join(missing)})",
                    ",".join(missing),
                )
            ]
        )
    lowered = [c.lower() for c in named]
    duplicates = sorted({c for c in named if lowered.count(c.lower()) > 1})
    if duplicates:
        # Only header-like names are shown: a stray data cell may hold personal data.
        shown = [c for c in duplicates if c.lower() in by_lower or c.startswith("metadata.")]
        others = len(duplicates) - len(shown)
        listed = ", ".join(shown + ([f"{others} other name(s)"] if others else []))
        raise _RefusedWith(
            [
                file_error(
                    canonical,
                    f"duplicate column(s): {listed}; a header name may appear once",
                    ",".join(shown),
                )
            ]
        )
    if len(named) < len(columns):
        issues.append(
            file_warning(
                canonical, f"{len(columns) - len(named)} column(s) without a header name; ignored"
            )
        )
        frame = frame.loc[:, [c != "" for c in columns]]
    renames: dict[str, str] = {}
    for column in frame.columns:
        spec = by_lower.get(column.lower())
        if column not in expected and spec is not None and spec not in frame.columns:
            renames[column] = spec
    if renames:
        issues.append(
            file_warning(
                canonical,
                "column name(s) in the wrong case accepted: "
                + ", ".join(f"{old} as {new}" for old, new in renames.items()),
                ",".join(renames.values()),
            )
        )
        frame = frame.rename(columns=renames)
    missing = [c for c in expected if c not in frame.columns]
    unknown = [c for c in frame.columns if c not in expected and not c.startswith("metadata.")]
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.75)
            hints.append(f"{name} (is '{close[0]}' a misspelling?)" if close else name)
        raise _RefusedWith(
            [
                file_error(
                    canonical,
                    f"missing required column(s) for OneRoster {version}: {', '.join(hints)}",
                    ",".join(missing),
                )
            ]
        )
    if unknown:
        issues.append(file_warning(canonical, f"unknown column(s) ignored: {', '.join(unknown)}"))
    keep = [c for c in KEEP_COLUMNS.get(canonical, expected) if c in frame.columns]
    return frame[keep]


def _detect_version(users: pd.DataFrame | None, declared: str | None) -> str:
    """The users.csv header decides (1.1 has role/orgSourcedIds, 1.2 does not); the manifest must
    agree."""
    if users is None:
        return declared or "1.1"
    columns = {str(c).lower() for c in users.columns}
    v11 = all(c.lower() in columns for c in fmt.USERS_11_MARKERS)
    v12 = any(c.lower() in columns for c in fmt.USERS_12_MARKERS)
    if v11 and not v12:
        header_version = "1.1"
    elif v12 and "role" not in columns:
        header_version = "1.2"
    else:
        # Neither (or both) sets of markers: trust the manifest, else the role column.
        header_version = declared or ("1.1" if "role" in columns else "1.2")
    if declared and declared != header_version:
        why = "has role and orgSourcedIds" if header_version == "1.1" else "has no role column"
        raise _RefusedWith(
            [
                file_error(
                    "users.csv",
                    f"manifest.csv says OneRoster {declared} but the users.csv header is OneRoster "
                    f"{header_version} ({why})",
                    "role",
                )
            ]
        )
    return header_version


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------


def canonicalise(frame: pd.DataFrame, canonical: str, issues: list[Issue]) -> pd.DataFrame:
    """Trim vocabulary columns and map case variants (TRUE, Scheduled) onto spec tokens."""
    frame = frame.copy()
    if "status" in frame.columns:
        status = map_distinct(frame["status"], lambda v: v.strip().lower())
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
        frame[column] = map_distinct(
            frame[column], lambda v, lookup=lookup: lookup.get(v.strip().lower(), v)
        )
    if "grades" in frame.columns:
        grades = frame["grades"]
        needs = grades.ne("") & ~isin(grades, fmt.GRADE_CODES)
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
    # A tobedeleted row only needs its sourcedId: it is removed, its other values are not used.
    # (orgs keep their checks: a removed org's type decides what it removes.)
    deleting = (
        set(frame.index[frame["status"].eq("tobedeleted")])
        if "status" in frame.columns and canonical != "orgs.csv"
        else set()
    )
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
        if check == UNIQUE_ID and case.failure_case in ("", None):
            continue  # blank sourcedIds are reported by the shape check
        if index in deleting and column not in ("sourcedId", "status"):
            continue
        bad_rows.add(index)
        message = _message_for(check, column, case.failure_case)
        sourced = str(ids.loc[index]) if ids is not None else ""
        issues.append(Issue(ERROR, canonical, _line(index), column, sourced, message))
    issues.sort(key=lambda i: (i.line, i.column))
    return issues, bad_rows


def _message_for(check: str, column: str, value: object) -> str:
    show = column in fmt.REPORTABLE_VALUE_COLUMNS
    if check == UNIQUE_ID:
        return f"duplicate {column} {value!s}; every row with it is rejected"
    if check.startswith("str_length"):
        return f"required value missing in {column}"
    if show and value not in (None, ""):
        return f"{check} (got {value!s})"
    return check


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------


def _reject_references(
    frame: pd.DataFrame,
    canonical: str,
    column: str,
    valid: pd.Series,
    target: str,
    issues: list[Issue],
    *,
    multi: bool = False,
    deleted: set[str] | None = None,
) -> pd.Series:
    """Mask of rows whose reference(s) in `column` point at nothing we know (or at a record this
    delivery deletes)."""
    values = frame[column]
    deleted = deleted or set()
    if not multi:
        bad = ~isin(values, valid) & values.ne("")
        for index, sourced, ref in zip(
            frame.index[bad], frame["sourcedId"][bad], values[bad], strict=True
        ):
            message = (
                f"references {target} {ref}, which this delivery marks tobedeleted"
                if ref in deleted
                else f"references unknown {target} {ref}"
            )
            issues.append(Issue(ERROR, canonical, _line(index), column, sourced, message))
        return bad
    single = ~values.str.contains(",", regex=False)
    bad = pd.Series(False, index=frame.index)
    bad[single] = ~isin(values[single], valid) & values[single].ne("")
    lists = values[~single]
    known = set(valid.tolist()) if len(lists) else set()
    for index, value in lists.items():
        if any(item.strip() not in known for item in value.split(",")):
            bad[index] = True
    for index in frame.index[bad]:
        value = values[index]
        unknown = [item.strip() for item in value.split(",") if item.strip() not in known]
        if "," not in value:
            unknown = [value.strip()]
        issues.append(
            Issue(
                ERROR,
                canonical,
                _line(index),
                column,
                frame.at[index, "sourcedId"],
                f"references unknown {target} {', '.join(unknown) or '(empty list item)'}",
            )
        )
    return bad


# ------------------------------------------------------------------------------------------------
# The delivery
# ------------------------------------------------------------------------------------------------


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

    raw: dict[str, _RawFile] = {}
    refusals: list[Issue] = []
    for file in fmt.ROSTER_FILES:
        if modes.get(file, "absent") == "absent" or file not in FILE_ENTITIES:
            continue
        try:
            raw[file] = _read_csv(present[file], file, issues)
        except _RefusedWith as refused:
            refusals.extend(refused.issues)
    if refusals:
        raise _RefusedWith(refusals)
    users_raw = raw.get("users.csv")
    version = _detect_version(users_raw.frame if users_raw else None, declared)
    if version == "1.1" and ROLES in raw:
        issues.append(
            file_warning(ROLES, "roles.csv belongs to OneRoster 1.2; ignored in a 1.1 delivery")
        )
        del raw[ROLES]
        modes[ROLES] = "absent"
    if version == "1.2" and modes.get("users.csv", "absent") != "absent":
        if modes.get(ROLES, "absent") == "absent":
            raise _RefusedWith([file_error(ROLES, "OneRoster 1.2 delivery without roles.csv")])

    frames: dict[str, pd.DataFrame] = {}
    rows_read: dict[str, int] = {}
    protected: dict[str, set[str]] = {entity: set() for entity in ENTITY_FILES}
    # Users with a rejected roles.csv row (1.2): their role cannot be resolved from the rest.
    role_owners: set[str] = set()
    for file, raw_file in raw.items():
        try:
            frame = _check_header(raw_file.frame, file, version, issues)
        except _RefusedWith as refused:
            refusals.extend(refused.issues)
            continue
        blank = frame.iloc[:, 0].eq("") if len(frame.columns) else pd.Series(dtype=bool)
        if blank.any():  # only rows with an empty first cell can be blank lines
            blank[blank] = frame[blank].eq("").all(axis=1)
        if blank.any():
            for index in frame.index[blank][:_MAX_ROW_NOTES]:
                issues.append(Issue(WARNING, file, _line(index), "", "", "blank line ignored"))
            if blank.sum() > _MAX_ROW_NOTES:
                issues.append(
                    file_warning(
                        file, f"{int(blank.sum()) - _MAX_ROW_NOTES} more blank line(s) ignored"
                    )
                )
            frame = frame[~blank]
        rows_read[file] = len(frame) + len(raw_file.rejected)
        if rows_read[file] == 0 and modes[file] == "bulk" and file in _CORE_FILES:
            refusals.append(
                file_error(
                    file,
                    "bulk file has a header but no rows; a bulk file must hold the complete set "
                    "(declare it absent in manifest.csv to leave it untouched)",
                )
            )
            continue
        entity = FILE_ENTITIES[file]
        for cells in raw_file.rejected.values():
            protected[entity].update(_protected_forms(_cell(cells, "sourcedId")))
            if file == ROLES:
                role_owners.update(_protected_forms(_cell(cells, "userSourcedId")))
        frames[file] = canonicalise(frame, file, issues)
    if refusals:
        raise _RefusedWith(refusals)

    clean: dict[str, pd.DataFrame] = {}
    for file, frame in frames.items():
        failures, bad = _schema_failures(frame, file, version)
        if modes[file] == "delta":
            for index in frame.index[frame["status"].eq("")]:
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
            for sourced_id in rejected["sourcedId"]:
                protected[entity].update(_protected_forms(sourced_id))
            if file == ROLES:
                for owner in rejected["userSourcedId"]:
                    role_owners.update(_protected_forms(owner))
            frame = frame.drop(index=sorted(bad))
        clean[entity] = frame

    _check_references(clean, modes, known, protected, role_owners - {""}, issues)
    for entity, unused in _CHECKED_ONLY.items():  # validated, but nothing downstream reads them
        if entity in clean:
            clean[entity] = clean[entity].drop(columns=list(unused), errors="ignore")
    return ValidatedDelivery(version, modes, clean, protected, issues, rows_read)


def _reference_pool(
    clean: dict[str, pd.DataFrame],
    entity: str,
    modes: dict[str, str],
    known: Iterable[str],
) -> pd.Series:
    """Ids a reference may point at: the delivered rows, plus the store's for delta/absent files
    (a str Series, possibly with repeats: membership tests are vectorised)."""
    parts: list[pd.Series] = []
    frame = clean.get(entity)
    if frame is not None:
        parts.append(frame["sourcedId"][frame["status"].ne("tobedeleted")])
    if modes.get(ENTITY_FILES[entity], "absent") != "bulk":
        parts.append(pd.Series(list(known), dtype="str"))
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.Series([], dtype="str")
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


def _deleted_ids(clean: dict[str, pd.DataFrame], entity: str) -> set[str]:
    frame = clean.get(entity)
    if frame is None:
        return set()
    return set(frame["sourcedId"][frame["status"].eq("tobedeleted")])


def _check_references(
    clean: dict[str, pd.DataFrame],
    modes: dict[str, str],
    known: KnownRecords,
    protected: dict[str, set[str]],
    role_owners: set[str],
    issues: list[Issue],
) -> None:
    def drop(entity: str, mask: pd.Series) -> None:
        if mask.any():
            frame = clean[entity]
            protected[entity].update(frame["sourcedId"][mask])
            if entity == "roles":
                role_owners.update(frame["userSourcedId"][mask])
            clean[entity] = frame[~mask]

    org_ids = _reference_pool(clean, "orgs", modes, known.org_types)
    if "users" in clean:
        users = clean["users"]
        if "orgSourcedIds" in users.columns:
            # A tobedeleted row only needs its sourcedId (as in the schema checks).
            live = users["status"].ne("tobedeleted")
            bad = _reject_references(
                users[live], "users.csv", "orgSourcedIds", org_ids, "org", issues, multi=True
            )
            mask = pd.Series(False, index=users.index)
            mask[bad.index] = bad
            drop("users", mask)
    user_ids = _reference_pool(clean, "users", modes, known.users)
    if "roles" in clean:
        roles = clean["roles"]
        live = roles["status"].ne("tobedeleted")
        mask = pd.Series(False, index=roles.index)
        bad = _reject_references(roles[live], ROLES, "userSourcedId", user_ids, "user", issues)
        bad |= _reject_references(roles[live], ROLES, "orgSourcedId", org_ids, "org", issues)
        mask[bad.index] = bad
        drop("roles", mask)
        _skip_users_with_rejected_roles(clean, protected, role_owners, issues)
        if modes.get(ROLES) == "bulk":
            _reject_users_without_roles(clean, protected, role_owners, issues)
    if "classes" in clean:
        org_types = dict(known.org_types)
        if "orgs" in clean:
            org_types.update(zip(clean["orgs"]["sourcedId"], clean["orgs"]["type"], strict=True))
        schools = {o for o, t in org_types.items() if t == "school"} & set(org_ids.tolist())
        classes = clean["classes"]
        live = classes["status"].ne("tobedeleted")
        school_ref = classes["schoolSourcedId"]
        not_school = live & isin(school_ref, org_ids) & ~isin(school_ref, schools)
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
            classes[live & ~not_school], "classes.csv", "schoolSourcedId", org_ids, "org", issues
        )
        mask = not_school.copy()
        mask[bad.index] = bad
        drop("classes", mask)
    class_ids = _reference_pool(clean, "classes", modes, known.classes)
    if "enrollments" in clean:
        enrollments = clean["enrollments"]
        user_gone = isin(enrollments["userSourcedId"], protected["users"])
        class_gone = isin(enrollments["classSourcedId"], protected["classes"])
        for index in enrollments.index[user_gone | class_gone]:
            column = "userSourcedId" if user_gone[index] else "classSourcedId"
            issues.append(
                Issue(
                    WARNING,
                    "enrollments.csv",
                    _line(index),
                    column,
                    enrollments.at[index, "sourcedId"],
                    f"skipped: its {'user' if user_gone[index] else 'class'} row was rejected; "
                    "the enrollment is left as it is",
                )
            )
        drop("enrollments", user_gone | class_gone)
        enrollments = clean["enrollments"]
        live = enrollments["status"].ne("tobedeleted")
        live_rows = enrollments[live]
        bad = _reject_references(
            live_rows,
            "enrollments.csv",
            "classSourcedId",
            class_ids,
            "class",
            issues,
            deleted=_deleted_ids(clean, "classes"),
        )
        bad_user = _reject_references(
            live_rows,
            "enrollments.csv",
            "userSourcedId",
            user_ids,
            "user",
            issues,
            deleted=_deleted_ids(clean, "users"),
        )
        mask = pd.Series(False, index=enrollments.index)
        mask[bad.index] = bad | bad_user
        drop("enrollments", mask)


def _skip_users_with_rejected_roles(
    clean: dict[str, pd.DataFrame],
    protected: dict[str, set[str]],
    owners: set[str],
    issues: list[Issue],
) -> None:
    """OneRoster 1.2: a user's Capti role and schools come from all of its roles.csv rows, so a
    user with a rejected roles row is left exactly as it is rather than resolved from the rest."""
    owners = owners - {""}
    if not owners:
        return
    protected["users"].update(owners)
    users = clean.get("users")
    if users is None:
        return
    affected = isin(users["sourcedId"], owners) & users["status"].ne("tobedeleted")
    for index in users.index[affected]:
        issues.append(
            Issue(
                WARNING,
                "users.csv",
                _line(index),
                "sourcedId",
                users.at[index, "sourcedId"],
                "skipped: one of the user's roles.csv rows was rejected; the account is left as it is",
            )
        )
    clean["users"] = users[~affected]


def _reject_users_without_roles(
    clean: dict[str, pd.DataFrame],
    protected: dict[str, set[str]],
    role_owners: set[str],
    issues: list[Issue],
) -> None:
    """OneRoster 1.2 bulk: a user with no roles.csv row at all is a broken reference (a role row
    keyed to a wrong user), not a user who left; it is rejected so it cannot become an archive.
    (A user whose roles are all ones Capti does not import, e.g. guardian, is skipped later.)"""
    users = clean.get("users")
    if users is None:
        return
    owners = set(clean["roles"]["userSourcedId"]) | role_owners
    orphan = users["status"].ne("tobedeleted") & ~isin(users["sourcedId"], owners)
    for index in users.index[orphan]:
        issues.append(
            Issue(
                ERROR,
                "users.csv",
                _line(index),
                "sourcedId",
                users.at[index, "sourcedId"],
                "user has no roles.csv row (every OneRoster 1.2 user needs one); row rejected, "
                "the account is left as it is",
            )
        )
    protected["users"].update(users["sourcedId"][orphan])
    clean["users"] = users[~orphan]
