"""Blank the OneRoster ``password`` column of a landed ``users.csv`` (pure, Dagster-free).

Capti never keeps passwords (accounts sign in through the district's SSO), not even in the
landing copy of a delivery. ``redact_passwords`` rewrites a landed users.csv in place so that no
password value is left, and changes nothing else the validator reads:

- only the cells of the column(s) whose header is ``password`` (any case, surrounding spaces
  ignored) are touched; every other byte - BOM, header, quoting of the other cells, CRLF / LF /
  CR line breaks, blank lines, ragged and short rows, a missing final newline - is copied as is;
- a non-empty password cell becomes empty. A quoted value spanning lines keeps its line breaks
  (``"\\n"``) so that every later line keeps its number; the shape of a broken value (text after
  the closing quote, a quote left open at the end of the file) is kept with a placeholder ``x``
  so the same quoting error is reported on the same line; the first byte that is not UTF-8 (or a
  NUL byte) is kept so the same encoding error is reported;
- in a row with more cells than the header (an unquoted comma before the password shifts it),
  the cells where the password can have landed are blanked too: all of them but the sourcedId
  when the validator rejects the row, only columns it does not read when it accepts the row
  (ragged); a cell beyond the header's width stays non-blank (``x``) so the row is still
  rejected the same way.

The common case stays one cheap pass: the header is read, and when it has a password column
pyarrow parses only that column to see whether any cell holds a value. The file is rewritten only
then, into a temporary file that replaces it atomically: when every record is one line (the
usual export) only the lines holding a password are visited (about 1 s for a million users,
one in twenty with a password), otherwise a scan in Python over a memory map (2 to 4 s per
100 MB) reads every record.
"""

import codecs
import csv
import io
import mmap
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as arrow
import pyarrow.compute as pc
import pyarrow.csv as arrow_csv

from capti_pipeline.lib.validate import KEEP_COLUMNS

USERS_FILE = "users.csv"
PASSWORD_COLUMN = "password"

_HEAD_BYTES = 1 << 16
_FLUSH_BYTES = 1 << 20
_QUOTE, _COMMA, _CR, _LF = b'"'[0], b","[0], b"\r"[0], b"\n"[0]
_PLAIN_LINE = re.compile(rb'[^"\r\n]*')  # a record without quotes up to its line break
_UNQUOTED = re.compile(rb"[^,\r\n]*")  # the rest of an unquoted cell
_CONTENT = re.compile(rb"\r\n|\r|\n|[^\r\n]+")
_QUOTED_CELL = re.compile(rb'"(?:[^"]|"")*"')

# How a cell was written: its value is read differently and its shape must be kept.
_PLAIN, _QUOTED, _BROKEN, _OPEN = range(4)


def is_users_file(name: str) -> bool:
    return name.lower() == USERS_FILE


def password_columns(path: Path) -> tuple[list[str], list[int]]:
    """The header of ``path`` (as the validator reads it) and the positions of its password column(s)."""
    with open(path, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
    text = head.decode("utf-8-sig", errors="replace")
    try:
        header = [cell.strip() for cell in next(csv.reader(io.StringIO(text, newline="")), [])]
    except csv.Error:
        return [], []
    return header, [i for i, name in enumerate(header) if name.lower() == PASSWORD_COLUMN]


@dataclass(frozen=True)
class _PasswordScan:
    """Where password values are: ``rows`` (0-based data rows) when every record of the file is
    one line and fits the header, so those rows are the only lines to rewrite; None when only a
    full scan can tell."""

    any_value: bool
    rows: np.ndarray | None
    records: int


def _scan_passwords(path: Path, width: int, positions: list[int]) -> _PasswordScan:
    """pyarrow parses only the password column(s). Errs on the side of "may hold one": a row
    that does not fit the header, or a file pyarrow cannot parse, counts as a value."""
    names = [f"c{i}" for i in range(width)]
    wanted = [names[p] for p in positions]
    odd_rows: list[str] = []

    def on_invalid(row: arrow_csv.InvalidRow) -> str:
        odd_rows.append(row.text)
        return "skip"

    try:
        table = arrow_csv.read_csv(
            path,
            read_options=arrow_csv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=arrow_csv.ParseOptions(
                newlines_in_values=True, ignore_empty_lines=False, invalid_row_handler=on_invalid
            ),
            convert_options=arrow_csv.ConvertOptions(
                include_columns=wanted,
                column_types=dict.fromkeys(wanted, arrow.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (arrow.ArrowException, ValueError, OSError):
        return _PasswordScan(True, None, 0)
    for text in odd_rows:
        cells = next(csv.reader([text]), [])
        extra = max(0, len(cells) - width)
        if any(cells[j] for p in positions for j in range(p, min(len(cells), p + extra + 1))):
            return _PasswordScan(True, None, 0)
    filled = np.zeros(len(table), dtype=bool)
    for name in wanted:
        filled |= pc.not_equal(table[name], "").to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(filled) if not odd_rows else None
    return _PasswordScan(bool(filled.any()), rows, len(table))


def has_password_values(path: Path, width: int, positions: list[int]) -> bool:
    """Whether any password cell of ``path`` may hold a value; pyarrow parses only those columns.

    Errs on the side of True: a row that does not fit the header, or a file pyarrow cannot
    parse, counts as "may hold one" (the rewrite then decides exactly).
    """
    return _scan_passwords(path, width, positions).any_value


def redact_passwords(path: Path) -> int:
    """Blank every password value of the users.csv at ``path`` in place; how many were blanked.

    The file is left untouched (same inode, same bytes) when it has no password value.
    """
    path = Path(path)
    header, positions = password_columns(path)
    if not positions:
        return 0
    scan = _scan_passwords(path, len(header), positions)
    if not scan.any_value:
        return 0
    ids = {i for i, name in enumerate(header) if name.lower() == "sourcedid"}
    read = {name.lower() for name in KEEP_COLUMNS[USERS_FILE]}
    unread = {i for i, name in enumerate(header) if name.lower() not in read}
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".redacting")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            if os.fstat(src.fileno()).st_size == 0:
                blanked = 0
            else:
                with mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    blanked = None
                    if scan.rows is not None:  # only the lines holding a value (the usual case)
                        blanked = _rewrite_rows(
                            buf, out.write, scan, positions, len(header), ids, unread
                        )
                    if blanked is None:
                        out.seek(0)
                        out.truncate()
                        blanked = _rewrite(buf, out.write, positions, len(header), ids, unread)
            out.flush()
            os.fsync(out.fileno())
        if blanked:
            os.replace(temp, path)
        else:
            os.unlink(temp)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return blanked


# --------------------------------------------------------------------------------------------
# The rewrite
# --------------------------------------------------------------------------------------------


def _rewrite(
    buf: mmap.mmap,
    write: Callable[[bytes], object],
    positions: list[int],
    width: int,
    ids: set[int],
    unread: set[int],
) -> int:
    """Copy ``buf`` to ``write`` record by record, blanking the password cells; cells blanked."""
    n = len(buf)
    row = _row_pattern(width, positions)
    pieces: list[bytes] = []
    size = 0
    blanked = 0
    pos = 0
    if buf[:3] == codecs.BOM_UTF8:
        pieces.append(codecs.BOM_UTF8)
        pos = 3
    header = True
    while pos < n:
        piece, stop, changed = _record(buf, pos, n, row, positions, width, ids, unread, header)
        blanked += changed
        pieces.append(piece)
        size += len(piece)
        if size >= _FLUSH_BYTES:
            write(b"".join(pieces))
            pieces, size = [], 0
        pos = stop
        header = False
    if pieces:
        write(b"".join(pieces))
    return blanked


def _record(
    buf: mmap.mmap,
    pos: int,
    n: int,
    row: "re.Pattern[bytes]",
    positions: list[int],
    width: int,
    ids: set[int],
    unread: set[int],
    header: bool = False,
) -> tuple[bytes, int, int]:
    """The record at ``pos`` with its password cells blanked: (bytes, where the next record
    starts, cells blanked)."""
    start = pos
    end = _PLAIN_LINE.match(buf, pos).end()  # type: ignore[union-attr]
    piece = b""
    blanked = 0
    if end < n and buf[end] == _QUOTE:
        whole = None if header else row.match(buf, pos)
        if whole is not None:  # the usual quoted record: exactly as many cells as the header
            end = whole.end()
            last, parts = pos, []
            for group in range(1, len(positions) + 1):
                cell = whole.group(group)
                kind = _kind(cell)
                if _content(cell, kind):
                    parts += [buf[last : whole.start(group)], _placeholder(cell, kind, width == 1)]
                    last = whole.end(group)
            if parts:
                blanked += len(parts) // 2
                piece = b"".join(parts) + buf[last:end]
        else:
            cells, kinds, end = _tokenize(buf, pos, n)
            changed = 0 if header else _blank(cells, kinds, positions, width, ids, unread)
            if changed:
                blanked += changed
                piece = b",".join(cells)
    elif not header:
        cells = buf[pos:end].split(b",")
        if len(cells) == width > 1:  # the usual plain record
            changed = 0
            for p in positions:
                cell = cells[p]
                if cell:
                    plain = cell.isascii() and b"\x00" not in cell
                    cells[p] = b"" if plain else _skeleton(cell)
                    changed += 1
        else:
            changed = _blank(cells, None, positions, width, ids, unread)
        if changed:
            blanked += changed
            piece = b",".join(cells)
    stop = _record_end(buf, end, n)
    return (piece + buf[end:stop] if piece else buf[start:stop]), stop, blanked


def _rewrite_rows(
    buf: mmap.mmap,
    write: Callable[[bytes], object],
    scan: _PasswordScan,
    positions: list[int],
    width: int,
    ids: set[int],
    unread: set[int],
) -> int | None:
    """:func:`_rewrite` visiting only the records of ``rows`` (0-based data rows), everything
    between them copied as it is; None when records and lines do not match one to one (a value
    spanning lines, a bare CR line break), where only the full scan is exact."""
    data = np.frombuffer(buf, dtype=np.uint8)
    breaks = np.flatnonzero(data == _LF)
    carriage = int(np.count_nonzero(data == _CR))
    if carriage and carriage != int(np.count_nonzero(data[breaks[breaks > 0] - 1] == _CR)):
        return None  # a bare CR somewhere: lines are not what the validator counts
    n = len(buf)
    starts = np.concatenate(([0], breaks + 1))
    starts = starts[starts < n]
    if scan.records != len(starts) - 1 or scan.rows is None:
        return None  # some record spans lines: row numbers are not line numbers
    rows = scan.rows
    row = _row_pattern(width, positions)
    blanked = 0
    copied = 0
    for r in rows.tolist():
        begin = int(starts[r + 1])  # line 0 is the header
        piece, stop, changed = _record(buf, begin, n, row, positions, width, ids, unread)
        if stop != (int(starts[r + 2]) if r + 2 < len(starts) else n):
            return None  # the record ran past its line: not one record per line
        if changed:
            write(buf[copied:begin])
            write(piece)
            copied = stop
            blanked += changed
    write(buf[copied:n])
    return blanked


def _row_pattern(width: int, positions: list[int]) -> "re.Pattern[bytes]":
    """A record of exactly ``width`` well-formed cells, the password cells as groups."""
    cell = rb'(?:"(?:[^"]|"")*"[^,\r\n]*|[^,\r\n"][^,\r\n]*|)'
    parts = [(b"(" + cell + b")" if i in positions else cell) for i in range(width)]
    return re.compile(b",".join(parts) + rb"(?=[\r\n]|\Z)")


def _record_end(buf: mmap.mmap, pos: int, n: int) -> int:
    """Position after the line break at ``pos`` (CRLF, CR or LF; nothing at the end)."""
    if pos >= n:
        return n
    if buf[pos] == _CR and pos + 1 < n and buf[pos + 1] == _LF:
        return pos + 2
    return pos + 1


def _tokenize(buf: mmap.mmap, pos: int, n: int) -> tuple[list[bytes], list[int], int]:
    """The raw cells of the record at ``pos`` and where its line break starts.

    Reads like pyarrow and Python's csv module: a cell starting with a quote runs to the closing
    quote (``""`` is a quote, line breaks are part of the value); text after the closing quote
    up to the next comma or line break belongs to the cell (a broken cell); a quote inside an
    unquoted cell is a character; a quote never closed runs to the end of the file.
    """
    cells: list[bytes] = []
    kinds: list[int] = []
    while True:
        if pos < n and buf[pos] == _QUOTE:
            i = pos + 1
            while True:
                q = buf.find(b'"', i)
                if q < 0:
                    cells.append(buf[pos:n])
                    kinds.append(_OPEN)
                    return cells, kinds, n
                if q + 1 < n and buf[q + 1] == _QUOTE:
                    i = q + 2
                    continue
                break
            tail = _UNQUOTED.match(buf, q + 1).end()  # type: ignore[union-attr]
            cells.append(buf[pos:tail])
            kinds.append(_BROKEN if tail > q + 1 else _QUOTED)
            pos = tail
        else:
            end = _UNQUOTED.match(buf, pos).end()  # type: ignore[union-attr]
            cells.append(buf[pos:end])
            kinds.append(_PLAIN)
            pos = end
        if pos < n and buf[pos] == _COMMA:
            pos += 1
            continue
        return cells, kinds, pos


def _kind(raw: bytes) -> int:
    if not raw.startswith(b'"'):
        return _PLAIN
    return _QUOTED if _QUOTED_CELL.fullmatch(raw) else _BROKEN


def _content(raw: bytes, kind: int) -> bytes:
    """The bytes of a cell's value as written (quotes around it removed, ``""`` kept)."""
    if kind == _PLAIN:
        return raw
    if kind == _OPEN:
        return raw[1:]
    if kind == _QUOTED:
        return raw[1:-1]
    close = 1  # a broken cell: find its closing quote as _tokenize did
    while True:
        close = raw.find(b'"', close)
        if raw[close + 1 : close + 2] != b'"':
            break
        close += 2
    return raw[1:close] + raw[close + 1 :]


def _value(raw: bytes, kind: int) -> str:
    content = _content(raw, kind)
    if kind != _PLAIN:
        content = content.replace(b'""', b'"')
    return content.decode("utf-8", errors="replace")


def _blank(
    cells: list[bytes],
    kinds: list[int] | None,
    positions: list[int],
    width: int,
    ids: set[int],
    unread: set[int],
) -> int:
    """Blank the password cells of one record in place; how many held a value."""
    count = len(cells)
    targets: list[int] = []
    extra = count - width
    misaligned = extra > 0 and any(
        _value(cells[j], kinds[j] if kinds else _PLAIN).strip() for j in range(width, count)
    )
    for p in positions:
        if p < count:
            targets.append(p)
        for j in range(p + 1, min(count, p + extra + 1)):  # where a shifted password may be
            if (j not in ids) if misaligned else (j in unread):
                targets.append(j)
    blanked = 0
    for j in targets:
        raw = cells[j]
        kind = kinds[j] if kinds else _PLAIN
        if not _content(raw, kind):
            continue
        keep_nonblank = count == 1 or (j >= width and bool(_value(raw, kind).strip()))
        new = _placeholder(raw, kind, keep_nonblank)
        if new != raw:
            cells[j] = new
            blanked += 1
    return blanked


def _placeholder(raw: bytes, kind: int, keep_nonblank: bool) -> bytes:
    """What replaces a password cell: empty, or the bare shape of the value (see module doc)."""
    content = _content(raw, kind)
    skeleton = _skeleton(content)
    if keep_nonblank and not skeleton.decode("utf-8", errors="replace").strip():
        skeleton += b"x"
    if kind == _BROKEN:
        return b'"' + skeleton + b'"x'
    if kind == _OPEN:  # runs to the end of the file: keep whether the file ends with a break
        ends_with_break = content.endswith((b"\r", b"\n"))
        last_is_text = bool(skeleton) and skeleton[-1] not in (_CR, _LF)
        return b'"' + skeleton + (b"" if ends_with_break or last_is_text else b"x")
    if b"\r" in skeleton or b"\n" in skeleton:
        return b'"' + skeleton + b'"'
    return skeleton


def _skeleton(content: bytes) -> bytes:
    """The line breaks of ``content``, plus its first non-UTF-8 byte and first NUL byte.

    A run of text between a CR and a LF becomes ``x`` so that no new CRLF pair appears.
    """
    special: list[int] = []
    if not content.isascii():
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as exc:
            special.append(exc.start)
    nul = content.find(b"\x00")
    if nul >= 0:
        special.append(nul)
    tokens = list(_CONTENT.finditer(content))
    out: list[bytes] = []
    for i, token in enumerate(tokens):
        text = token.group()
        if text[0] in (_CR, _LF):
            out.append(text)
            continue
        kept = bytes(content[o] for o in sorted(special) if token.start() <= o < token.end())
        if (
            not kept
            and 0 < i < len(tokens) - 1
            and tokens[i - 1].group() == b"\r"
            and tokens[i + 1].group()[0] == _LF
        ):
            kept = b"x"
        out.append(kept)
    return b"".join(out)
