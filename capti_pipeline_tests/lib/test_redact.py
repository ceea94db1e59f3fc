"""The password column of a landed users.csv is blanked, and the validator cannot tell.

Each case writes a real delivery twice - as delivered, and with users.csv redacted - and runs
the real validator on both: issues, frames, modes, row counts and protected ids must be equal,
and no password may be left in the redacted bytes.
"""

import csv
import io
import mmap
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from capti_pipeline.lib import redact
from capti_pipeline.lib.redact import has_password_values, password_columns, redact_passwords
from capti_pipeline.lib.validate import KEEP_COLUMNS, validate_delivery
from capti_pipeline_tests.fixtures.deliveries import PII_VALUES, Delivery, baseline

PASSWORDS = tuple(v for v in PII_VALUES if v.startswith("Pw!"))
SECRET = "S3cr3t-Lorikeet"


def _users_text(delivery: Delivery) -> str:
    return delivery.text("users.csv")


def _lines(delivery: Delivery) -> list[str]:
    return _users_text(delivery).split("\n")


def _replace_password(delivery: Delivery, sourced_id: str, raw_cell: str) -> bytes:
    """users.csv with the password cell of `sourced_id` written exactly as `raw_cell`."""
    password = f"Pw!{sourced_id}-Corvid7"
    text = _users_text(delivery)
    assert text.count(password) == 1
    return text.replace(password, raw_cell).encode()


def _case(version: str, mutate: Callable[[Delivery], bytes | None]) -> Delivery:
    delivery = baseline(version)
    raw = mutate(delivery)
    if raw is not None:
        delivery.raw["users.csv"] = raw
    return delivery


def _crlf(d: Delivery) -> bytes:
    d.line_end = "\r\n"
    return _users_text(d).encode()


def _bom_crlf(d: Delivery) -> bytes:
    return b"\xef\xbb\xbf" + _crlf(d)


def _bare_cr(d: Delivery) -> bytes:
    return _users_text(d).replace("\n", "\r").encode()


def _no_final_newline(d: Delivery) -> bytes:
    return _users_text(d).rstrip("\n").encode()


def _blank_lines(d: Delivery) -> bytes:
    lines = _lines(d)
    lines.insert(3, "")
    lines.insert(6, ",,,")
    return ("\n".join(lines) + "\n\n").encode()


def _ragged(d: Delivery) -> bytes:
    lines = _lines(d)
    lines[2] += ",,"
    lines[5] += ","
    return "\n".join(lines).encode()


def _short_rows(d: Delivery) -> bytes:
    lines = _lines(d)
    cells = next(csv.reader([lines[3]]))
    lines[3] = ",".join(cells[:5])  # stops long before the password
    return "\n".join(lines).encode()


def _misaligned(d: Delivery) -> bytes:
    text = _users_text(d)
    assert text.count("Zebediah,") == 1
    return text.replace("Zebediah,", "Zebediah,Quincy,").encode()  # an unquoted comma shifts


def _quoted_and_escaped(d: Delivery) -> bytes:
    return _replace_password(d, "0071", f'"{SECRET},""quoted"""')


def _password_spans_lines(d: Delivery) -> bytes:
    return _replace_password(d, "0072", f'"{SECRET}\nsecond line\r\nthird"')


def _cr_text_lf_in_password(d: Delivery) -> bytes:
    return _replace_password(d, "0073", f'"{SECRET}\rmiddle\n{SECRET}"')


def _broken_quote_in_password(d: Delivery) -> bytes:
    return _replace_password(d, "0074", f'"{SECRET}"tail')


def _broken_quote_elsewhere(d: Delivery) -> bytes:
    text = _users_text(d).replace("Zebediah", '"Zebediah"Z', 1)
    return text.encode()


def _open_quote_at_the_end(d: Delivery) -> bytes:
    lines = _lines(d)
    assert lines[-1] == ""
    lines[-2] = lines[-2].replace("Pw!da1-Corvid7", f'"{SECRET}')
    return "\n".join(lines[:-1]).encode()


def _open_quote_spanning_lines(d: Delivery) -> bytes:
    return _replace_password(d, "sa1", f'"{SECRET}\nmore')


def _invalid_utf8_in_password(d: Delivery) -> bytes:
    return _replace_password(d, "t2", "Pw\xa0!").replace(b"\xc2\xa0", b"\xff\xfe") + b""


def _nul_in_password(d: Delivery) -> bytes:
    return _replace_password(d, "t1", f"{SECRET}\x00x")


def _header_case_and_spaces(d: Delivery) -> bytes:
    text = _users_text(d)
    return text.replace(",password", ", Password ", 1).encode()


def _non_ascii_and_whitespace(d: Delivery) -> bytes:
    return _replace_password(d, "0071", "Zoë-Ñ-" + SECRET).replace(b"Pw!0072-Corvid7", b"   ")


def _password_first_column(d: Delivery) -> bytes:
    header = d.files["users.csv"].header
    header.remove("password")
    header.insert(0, "password")
    lines = _lines(d)
    lines.insert(4, SECRET)  # a row holding nothing but a password
    return "\n".join(lines).encode()


CASES: dict[str, tuple[str, Callable[[Delivery], bytes | None]]] = {
    "lf-1.1": ("1.1", lambda d: None),
    "lf-1.2": ("1.2", lambda d: None),
    "crlf": ("1.1", _crlf),
    "bom-crlf-1.2": ("1.2", _bom_crlf),
    "bare-cr": ("1.1", _bare_cr),
    "no-final-newline": ("1.1", _no_final_newline),
    "blank-lines": ("1.2", _blank_lines),
    "ragged": ("1.1", _ragged),
    "ragged-1.2": ("1.2", _ragged),
    "short-rows": ("1.2", _short_rows),
    "misaligned-1.1": ("1.1", _misaligned),
    "misaligned-1.2": ("1.2", _misaligned),
    "quoted-escaped": ("1.1", _quoted_and_escaped),
    "spans-lines": ("1.2", _password_spans_lines),
    "cr-text-lf": ("1.1", _cr_text_lf_in_password),
    "broken-quote-password": ("1.2", _broken_quote_in_password),
    "broken-quote-elsewhere": ("1.1", _broken_quote_elsewhere),
    "open-quote-at-end": ("1.1", _open_quote_at_the_end),
    "open-quote-spanning-lines": ("1.2", _open_quote_spanning_lines),
    "invalid-utf8": ("1.1", _invalid_utf8_in_password),
    "nul-byte": ("1.2", _nul_in_password),
    "header-case-spaces": ("1.2", _header_case_and_spaces),
    "non-ascii-whitespace": ("1.1", _non_ascii_and_whitespace),
    "password-first-column": ("1.1", _password_first_column),
}


def _validated(directory: Path):
    result = validate_delivery(directory)
    return result


def _assert_same_validation(original: Path, redacted: Path) -> None:
    a, b = _validated(original), _validated(redacted)
    assert [i.one_line() for i in b.issues] == [i.one_line() for i in a.issues]
    assert (b.version, b.modes, b.rows_read, b.protected) == (
        a.version,
        a.modes,
        a.rows_read,
        a.protected,
    )
    assert sorted(b.frames) == sorted(a.frames)
    for name, frame in a.frames.items():
        pd.testing.assert_frame_equal(b.frames[name], frame)


@pytest.mark.parametrize("case", sorted(CASES))
def test_redacted_copy_validates_exactly_like_the_delivery(case: str, tmp_path: Path) -> None:
    version, mutate = CASES[case]
    delivery = _case(version, mutate)
    original = delivery.write(tmp_path / "delivered")
    redacted = tmp_path / "landed"
    shutil.copytree(original, redacted)
    before = (original / "users.csv").read_bytes()

    blanked = redact_passwords(redacted / "users.csv")

    after = (redacted / "users.csv").read_bytes()
    assert blanked > 0
    for secret in (*PASSWORDS, SECRET, "Corvid7", "Lorikeet"):
        assert secret.encode() not in after, secret
    assert stat.S_IMODE((redacted / "users.csv").stat().st_mode) == 0o600
    assert sorted(p.name for p in redacted.iterdir()) == sorted(p.name for p in original.iterdir())
    assert after.count(b"\n") == before.count(b"\n") and after.count(b"\r") == before.count(b"\r")
    _assert_same_validation(original, redacted)


def test_only_password_cells_change(tmp_path: Path) -> None:
    delivery = baseline("1.2")
    delivery.line_end = "\r\n"
    path = tmp_path / "users.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _quoted_and_escaped_12(delivery))
    before = path.read_bytes()
    assert redact_passwords(path) == 8
    after = path.read_bytes()
    assert after.startswith(b"\xef\xbb\xbf") and after.count(b"\r\n") == before.count(b"\r\n")
    old = list(csv.reader(io.StringIO(before.decode("utf-8-sig"), newline="")))
    new = list(csv.reader(io.StringIO(after.decode("utf-8-sig"), newline="")))
    column = old[0].index("password")
    assert new[0] == old[0]
    for old_row, new_row in zip(old[1:], new[1:], strict=True):
        assert new_row[column] == ""
        assert new_row[:column] + new_row[column + 1 :] == old_row[:column] + old_row[column + 1 :]
    # Quoting of the other cells is kept byte for byte: only the password cells were removed.
    stripped = before
    for secret in (*PASSWORDS, f'"{SECRET},""quoted"""'):
        stripped = stripped.replace(secret.encode(), b"")
    assert after == stripped


def _quoted_and_escaped_12(delivery: Delivery) -> bytes:
    text = delivery.text("users.csv")
    return text.replace("Pw!0071-Corvid7", f'"{SECRET},""quoted"""').encode()


def test_no_password_values_leaves_the_file_untouched(tmp_path: Path) -> None:
    delivery = baseline("1.1")
    for row in delivery.files["users.csv"].rows:
        row["password"] = ""
    path = tmp_path / "users.csv"
    path.write_bytes(delivery.text("users.csv").encode())
    inode, data = path.stat().st_ino, path.read_bytes()
    header, positions = password_columns(path)
    assert positions == [header.index("password")]
    assert not has_password_values(path, len(header), positions)
    assert redact_passwords(path) == 0
    assert (path.stat().st_ino, path.read_bytes()) == (inode, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.csv"]  # no temp file left


def test_a_file_without_a_password_column_is_not_read_past_its_header(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    path.write_bytes(b"sourcedId,givenName\nu1,Ann\n" + b"\xff" * 10)  # would fail to parse
    assert password_columns(path) == (["sourcedId", "givenName"], [])
    assert redact_passwords(path) == 0


def test_detection_finds_a_single_value_in_a_big_file(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    rows = "".join(f"u{i},Name{i},\n" for i in range(200_000))
    path.write_text(f"sourcedId,givenName,password\n{rows}u-last,Last,{SECRET}\n")
    header, positions = password_columns(path)
    assert has_password_values(path, len(header), positions)
    assert redact_passwords(path) == 1
    data = path.read_bytes()
    assert SECRET.encode() not in data and data.endswith(b"u-last,Last,\n")
    assert not has_password_values(path, len(header), positions)


@pytest.mark.parametrize("case", sorted(CASES))
def test_visiting_only_lines_with_a_password_writes_what_the_full_scan_writes(
    case: str, tmp_path: Path
) -> None:
    version, mutate = CASES[case]
    path = _case(version, mutate).write(tmp_path / "delivered") / "users.csv"
    header, positions = password_columns(path)
    ids = {i for i, name in enumerate(header) if name.lower() == "sourcedid"}
    read = {name.lower() for name in KEEP_COLUMNS["users.csv"]}
    unread = {i for i, name in enumerate(header) if name.lower() not in read}
    scan = redact._scan_passwords(path, len(header), positions)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        full, partial = io.BytesIO(), io.BytesIO()
        blanked = redact._rewrite(buf, full.write, positions, len(header), ids, unread)
        visited = redact._rewrite_rows(
            buf, partial.write, scan, positions, len(header), ids, unread
        )
    if visited is None:  # records spanning lines, bare CRs, rows not fitting the header
        return
    assert (visited, partial.getvalue()) == (blanked, full.getvalue())


def test_the_line_visiting_path_is_taken_for_a_plain_export(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    rows = "".join(f"u{i},Name{i},{'pw' + str(i) if i % 20 == 0 else ''}\r\n" for i in range(5000))
    path.write_text(f"sourcedId,givenName,password\r\n{rows}")
    header, positions = password_columns(path)
    scan = redact._scan_passwords(path, len(header), positions)
    assert scan.rows is not None and len(scan.rows) == 250
    assert redact_passwords(path) == 250
    assert b"pw" not in path.read_bytes() and path.read_bytes().count(b"\r\n") == 5001
