"""Land one roster delivery from a district's drop folder (local or SFTP) into a private directory.

Pure, Dagster-free. The Dagster asset/sensor layer maps the exceptions below to run outcomes:

- ``DeliveryNotReady``      nothing (complete) delivered yet: skip the run with a clear status.
- ``TransientSourceError``  network trouble or a file changed while we read it: retry.
- ``PermanentSourceError``  configuration problem (host key, auth, missing folder, bad URL): never retry.
- ``DeliveryRefused``       the delivery itself is unsafe or ambiguous: fail like a validation failure.

Delivery rules (what counts as "the delivery" in the source folder root):

- Only regular files at the folder root are considered; sub-folders and symlinks are ignored.
- Hidden names (``.foo``) and upload temp names (``*.part``, ``*.filepart``, ``*.tmp``, ...) are
  *upload markers*: never landed, but watched by the stability check. If they are still changing
  the delivery is not ready; if they are stable (stale leftovers) they are ignored with a warning.
- ``*.csv`` (any case) files at the root form a *loose* delivery; with ``require_manifest`` (the
  default) it must contain ``manifest.csv`` (any case) or it is ``DeliveryNotReady``; without, a
  stable folder of CSVs is taken as it is (the caller decides per district, see the README).
- Exactly one ``*.zip`` (any case) and no loose CSV forms a *zip* delivery.
- Loose CSVs together with a zip, several zips, or two names that differ only by case are
  ambiguous: ``DeliveryRefused`` naming the files (an operator has to clean the folder).
- Any other file (``readme.txt``) is ignored with a warning.

Zip rules: every entry is checked before anything is extracted; the archive is refused when it has
more than ``zip_max_entries`` entries, any entry name is absolute (``/x``, ``\\x``), has a drive
letter (``C:``), a ``..`` component, a NUL byte, is a symlink, is encrypted, or when the declared
uncompressed total exceeds ``zip_max_uncompressed_bytes``. Extraction streams with a byte counter,
so an archive whose headers under-declare sizes is still stopped at the cap. CSV entries must all
sit at the zip root or all inside one single sub-folder; hidden entries and ``__MACOSX/`` are
ignored, other non-CSV entries are ignored with a warning. With ``require_manifest`` the zip must
contain ``manifest.csv`` (``DeliveryRefused`` otherwise, since a complete zip cannot become ready
later). The zip itself is downloaded to a scratch directory and never kept in the landing
directory.

Passwords: the landing copy of ``users.csv`` carries no password values. Files are copied byte for
byte (sha256 of the delivered bytes, which the fingerprint is built from); then, when the
``password`` column of users.csv holds any value, that column is blanked in place before the
landing directory appears (``capti_pipeline.lib.redact``: every other byte is kept, so validation
is unchanged). ``LandedFile.passwords_redacted`` counts the values removed.

Warnings (ignored files, stale upload markers, non-CSV zip entries) are returned as
``LandedDelivery.issues`` (file-level warnings for the run's report). ``DeliveryRefused`` carries
the ``file`` it is about and the warnings found before it.

Stability: the folder is listed, ``stability_window_s`` is waited, and it is listed again; any
difference in (name, size, mtime) is ``DeliveryNotReady``. Each file is re-stat'ed right after its
download; a changed size/mtime or a byte count different from the listing is
``TransientSourceError``.

Landing: everything is written into ``.{landing_dir.name}.partial-XXXX`` next to ``landing_dir``
(files as temp names + ``os.replace`` + ``fsync``), then the whole directory is renamed to
``landing_dir``. On any error the partial directory is removed. Directories are 0o700 and files
0o600 (student personal data).
"""

import contextlib
import hashlib
import logging
import os
import posixpath
import queue
import re
import shutil
import stat
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

from capti_pipeline.lib import redact
from capti_pipeline.lib.issues import Issue, file_warning

log = logging.getLogger(__name__)

_COPY_CHUNK = 1024 * 1024
_KERNEL_COPY_STEP = 64 * 1024 * 1024
_UPLOAD_MARKER_SUFFIXES = (
    ".part",
    ".partial",
    ".filepart",
    ".tmp",
    ".temp",
    ".uploading",
    ".crdownload",
)
_MAX_NAMES_IN_MESSAGE = 10
_STALE_MARKERS = "ignored stable upload-marker/hidden files"
MANIFEST_NAME = "manifest.csv"
# Starts the warning of a delivery taken without manifest.csv (``require_manifest=False``); the
# district's next runs read it back from the report to know it delivers without one.
NO_MANIFEST_WARNING = "delivery taken without manifest.csv"


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """Where a district's deliveries appear.

    ``url`` is a local folder path (or ``file:///path``) or ``sftp://user@host:port/abs/path``.
    SFTP needs ``known_hosts_path`` and ``sftp_key_path`` and/or ``password_env`` (the NAME of an
    environment variable holding the password; the value is never logged or put in messages).
    """

    url: str
    sftp_key_path: str | None = None
    known_hosts_path: str | None = None
    password_env: str | None = None
    connect_timeout_s: float = 15.0  # TCP connect, SSH banner, auth and channel open
    io_timeout_s: float = 60.0  # per-read timeout on the SFTP channel
    keepalive_s: int = 30


@dataclass(frozen=True)
class ParsedSource:
    """A validated ``SourceSpec.url``."""

    kind: str  # "local" | "sftp"
    path: str  # local folder path, or absolute remote folder path
    host: str | None = None
    port: int = 22
    username: str | None = None

    @property
    def display(self) -> str:
        """Operator-facing name of the source folder (never contains secrets)."""
        if self.kind == "local":
            return self.path
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"sftp://{self.username}@{host}:{self.port}{self.path}"


@dataclass(frozen=True)
class LandedFile:
    name: str  # file name inside the landing dir, e.g. "users.csv" (kept as delivered)
    path: Path
    size: int  # bytes delivered
    sha256: str  # of the bytes delivered (the landing copy differs when passwords were redacted)
    passwords_redacted: int = 0  # password values blanked in the landing copy


@dataclass(frozen=True)
class LandedDelivery:
    directory: Path
    files: dict[str, LandedFile]  # keyed by name
    source_kind: str  # "local" | "sftp"
    archive_name: str | None  # name of the zip if the delivery was a zip, else None
    fingerprint: str  # sha256 over the sorted (name, sha256) pairs, see delivery_fingerprint()
    warnings: list[str] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)  # the warnings, as report issues
    manifest: bool = True  # whether the delivery had a manifest.csv

    @property
    def passwords_redacted(self) -> int:
        return sum(f.passwords_redacted for f in self.files.values())


@dataclass(frozen=True)
class RemoteEntry:
    """One directory entry of the source folder (not following symlinks)."""

    name: str
    size: int
    mtime: float
    kind: str  # "file" | "dir" | "symlink" | "other"


class IntakeError(Exception):
    """Base class; ``str(e)`` is an operator-facing message without secrets."""


class DeliveryNotReady(IntakeError):
    """Nothing (complete) delivered yet; skip this run."""


class TransientSourceError(IntakeError):
    """Connection trouble or a file changed while being read; retryable."""


class PermanentSourceError(IntakeError):
    """Bad configuration (URL, host key, credentials, folder); never retried."""


class DeliveryRefused(IntakeError):
    """The delivery is unsafe or ambiguous; treated like a validation failure.

    ``file`` names what the refusal is about (the zip, or the source folder); ``warnings`` are
    the intake warnings found before it.
    """

    def __init__(self, message: str, file: str = "") -> None:
        super().__init__(message)
        self.file = file
        self.warnings: list[Issue] = []


# --------------------------------------------------------------------------------------------
# URL parsing
# --------------------------------------------------------------------------------------------


def _redact_url(url: str) -> str:
    """The URL with any password in its userinfo replaced by ***."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", url)


def parse_source(spec: SourceSpec) -> ParsedSource:
    """Validate ``spec`` (URL and, for SFTP, the auth settings); PermanentSourceError if malformed."""
    url = spec.url
    if not isinstance(url, str) or not url.strip():
        raise PermanentSourceError(
            "source URL is empty; expected a folder path or sftp://user@host:port/path"
        )
    url = url.strip()
    if "\x00" in url:
        raise PermanentSourceError("source URL contains a NUL byte")

    scheme_match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    scheme = scheme_match.group(1).lower() if scheme_match and "://" in url else None
    if scheme is None:
        return ParsedSource(kind="local", path=str(Path(url).expanduser()))

    shown = _redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise PermanentSourceError(f"malformed source URL {shown!r}: {exc}") from None

    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise PermanentSourceError(f"file URL {shown!r} must not name a host")
        path = unquote(parts.path)
        if not path:
            raise PermanentSourceError(f"file URL {shown!r} has no folder path")
        return ParsedSource(kind="local", path=path)

    if scheme != "sftp":
        raise PermanentSourceError(
            f"unsupported source URL scheme {scheme!r} in {shown!r}; "
            "use a local folder path or sftp://user@host:port/path"
        )
    if parts.password is not None:
        raise PermanentSourceError(
            f"SFTP URL {shown!r} contains a password; put it in an environment variable "
            "and name that variable in password_env"
        )
    if parts.query or parts.fragment:
        raise PermanentSourceError(f"SFTP URL {shown!r} must not have a query or fragment")
    if not parts.username:
        raise PermanentSourceError(
            f"SFTP URL {shown!r} has no user name (sftp://user@host:port/path)"
        )
    if not parts.hostname:
        raise PermanentSourceError(f"SFTP URL {shown!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise PermanentSourceError(f"SFTP URL {shown!r} has an invalid port") from None
    if port is None:
        port = 22
    if not 1 <= port <= 65535:
        raise PermanentSourceError(f"SFTP URL {shown!r} has an invalid port")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise PermanentSourceError(
            f"SFTP URL {shown!r} has no absolute folder path (sftp://user@host:port/abs/path)"
        )
    if "\x00" in path:
        raise PermanentSourceError(f"SFTP URL {shown!r} contains a NUL byte")
    path = posixpath.normpath(path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")

    if not spec.known_hosts_path:
        raise PermanentSourceError(
            "SFTP source needs known_hosts_path (a project-owned known_hosts file with the "
            f"server's host key; entries for port {port} are written [host]:{port})"
            if port != 22
            else "SFTP source needs known_hosts_path (a project-owned known_hosts file)"
        )
    if not spec.sftp_key_path and not spec.password_env:
        raise PermanentSourceError("SFTP source needs sftp_key_path and/or password_env")
    return ParsedSource(
        kind="sftp", path=path, host=parts.hostname, port=port, username=unquote(parts.username)
    )


# --------------------------------------------------------------------------------------------
# Source folders
# --------------------------------------------------------------------------------------------


class SourceFolder(Protocol):
    display: str

    def list_entries(self) -> list[RemoteEntry]: ...

    def stat(self, name: str) -> RemoteEntry: ...

    def fetch(self, name: str, fh: BinaryIO) -> int: ...

    def close(self) -> None: ...


def kind_from_mode(mode: int | None) -> str:
    """A listing entry's kind from its st_mode (local stat or SFTP attributes alike)."""
    if mode is None:
        return "file"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


class LocalFolder:
    """A delivery folder on a local (or mounted) file system."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.display = path

    def list_entries(self) -> list[RemoteEntry]:
        try:
            with os.scandir(self.path) as it:
                entries = []
                for de in it:
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # vanished between readdir and stat; the next listing decides
                    entries.append(
                        RemoteEntry(de.name, st.st_size, st.st_mtime, kind_from_mode(st.st_mode))
                    )
                return entries
        except FileNotFoundError:
            raise PermanentSourceError(f"source folder {self.path} does not exist") from None
        except NotADirectoryError:
            raise PermanentSourceError(f"source path {self.path} is not a folder") from None
        except PermissionError:
            raise PermanentSourceError(f"no permission to read source folder {self.path}") from None
        except OSError as exc:
            raise TransientSourceError(f"cannot list source folder {self.path}: {exc}") from exc

    def stat(self, name: str) -> RemoteEntry:
        try:
            st = os.stat(os.path.join(self.path, name), follow_symlinks=False)
        except FileNotFoundError:
            raise TransientSourceError(
                f"{name} disappeared from {self.path} during intake"
            ) from None
        except OSError as exc:
            raise TransientSourceError(f"cannot stat {name} in {self.path}: {exc}") from exc
        return RemoteEntry(name, st.st_size, st.st_mtime, kind_from_mode(st.st_mode))

    def fetch(self, name: str, fh: BinaryIO) -> int:
        src_path = os.path.join(self.path, name)
        try:
            fd = os.open(src_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise TransientSourceError(
                f"{name} disappeared from {self.path} during intake"
            ) from None
        except PermissionError:
            raise PermanentSourceError(f"no permission to read {name} in {self.path}") from None
        except OSError as exc:
            raise TransientSourceError(f"cannot open {name} in {self.path}: {exc}") from exc
        total = 0
        try:
            with os.fdopen(fd, "rb") as src:
                if isinstance(fh, _HashingWriter) and fh.can_copy_from_file():
                    return fh.copy_from_file(src.fileno())
                while chunk := src.read(_COPY_CHUNK):
                    fh.write(chunk)
                    total += len(chunk)
        except OSError as exc:
            raise TransientSourceError(f"copying {name} from {self.path} failed: {exc}") from exc
        return total

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _open_folder(spec: SourceSpec, source: ParsedSource) -> Iterator[SourceFolder]:
    if source.kind == "local":
        folder: SourceFolder = LocalFolder(source.path)
    else:
        from capti_pipeline.lib.sftp import (
            open_sftp_folder,
        )  # lazy: keeps paramiko out of local runs

        folder = open_sftp_folder(spec, source)
    try:
        yield folder
    finally:
        folder.close()


# --------------------------------------------------------------------------------------------
# Classifying the folder listing
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    csvs: list[RemoteEntry]
    archive: RemoteEntry | None
    watched: dict[str, tuple[int, float]]  # everything the stability check compares
    markers: list[str]
    ignored: list[str]


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_NAMES_IN_MESSAGE])
    if len(names) > _MAX_NAMES_IN_MESSAGE:
        shown += f", ... ({len(names) - _MAX_NAMES_IN_MESSAGE} more)"
    return shown


def _is_upload_marker(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(_UPLOAD_MARKER_SUFFIXES)


def _check_listed_name(name: str, display: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise DeliveryRefused(
            f"source {display} listed an unsafe file name {name!r}; refusing the delivery"
        )


def _relevant(entries: Iterable[RemoteEntry], display: str) -> dict[str, RemoteEntry]:
    """Entries the stability check watches: regular files that are CSV/zip or upload markers."""
    out = {}
    for e in entries:
        if e.name in (".", ".."):
            continue
        _check_listed_name(e.name, display)
        lower = e.name.lower()
        if e.kind == "file" and (_is_upload_marker(e.name) or lower.endswith((".csv", ".zip"))):
            out[e.name] = e
    return out


def _classify(entries: list[RemoteEntry], display: str, require_manifest: bool = True) -> _Plan:
    csvs: list[RemoteEntry] = []
    zips: list[RemoteEntry] = []
    markers: list[str] = []
    ignored: list[str] = []
    relevant = _relevant(entries, display)
    for e in sorted(entries, key=lambda e: e.name):
        if e.name in (".", ".."):
            continue
        lower = e.name.lower()
        if e.kind == "dir":
            continue
        if _is_upload_marker(e.name):
            if e.kind == "file":
                markers.append(e.name)
        elif e.kind != "file":
            if lower.endswith((".csv", ".zip")):
                ignored.append(f"{e.name} (not a regular file)")
        elif lower.endswith(".csv"):
            csvs.append(e)
        elif lower.endswith(".zip"):
            zips.append(e)
        else:
            ignored.append(e.name)

    if not csvs and not zips:
        if markers:
            raise DeliveryNotReady(
                f"no delivery in {display} yet: only upload-in-progress files ({_names(markers)})"
            )
        if ignored:
            raise DeliveryNotReady(
                f"no delivery in {display} yet: no CSV or zip files (ignored: {_names(ignored)})"
            )
        raise DeliveryNotReady(f"no delivery in {display} yet: the folder is empty")
    if csvs and zips:
        raise DeliveryRefused(
            f"ambiguous delivery in {display}: both loose CSV files ({_names(e.name for e in csvs)}) "
            f"and zip archive(s) ({_names(e.name for e in zips)}); remove one of them",
            display,
        )
    if len(zips) > 1:
        raise DeliveryRefused(
            f"ambiguous delivery in {display}: several zip archives ({_names(e.name for e in zips)}); "
            "leave exactly one",
            display,
        )
    if csvs:
        _refuse_case_duplicates([e.name for e in csvs], display, display)
        if require_manifest and not any(e.name.lower() == "manifest.csv" for e in csvs):
            raise DeliveryNotReady(
                f"delivery in {display} not ready: {len(csvs)} CSV file(s) but manifest.csv not present yet"
            )
    return _Plan(
        csvs=csvs,
        archive=zips[0] if zips else None,
        watched={n: (e.size, e.mtime) for n, e in relevant.items()},
        markers=markers,
        ignored=ignored,
    )


def _refuse_case_duplicates(names: list[str], where: str, file: str) -> None:
    seen: dict[str, str] = {}
    for n in names:
        other = seen.setdefault(n.casefold(), n)
        if other != n:
            raise DeliveryRefused(
                f"ambiguous delivery in {where}: {other!r} and {n!r} differ only by letter case",
                file,
            )


def _check_stable(
    first: dict[str, tuple[int, float]],
    second: dict[str, tuple[int, float]],
    window: float,
    display: str,
) -> None:
    for name in sorted(first.keys() | second.keys()):
        a, b = first.get(name), second.get(name)
        if a == b:
            continue
        if a is None:
            what = "appeared"
        elif b is None:
            what = "disappeared"
        elif a[0] != b[0]:
            what = f"changed size ({a[0]} -> {b[0]} bytes)"
        else:
            what = "was modified"
        raise DeliveryNotReady(
            f"delivery in {display} not ready: {name} {what} during the {window:g} s stability "
            "window; upload still in progress"
        )


def observe_delivery(spec: SourceSpec) -> dict[str, tuple[int, float]]:
    """name -> (size, mtime) of the files the stability check watches, without downloading.

    Includes CSV/zip files and upload markers (hidden / ``*.part`` names) at the folder root. A
    sensor compares two observations across ticks; equal and non-empty means "stable".
    Raises PermanentSourceError / TransientSourceError like ``land_delivery``.
    """
    source = parse_source(spec)
    with _open_folder(spec, source) as folder:
        relevant = _relevant(folder.list_entries(), folder.display)
    return {n: (e.size, e.mtime) for n, e in sorted(relevant.items())}


# --------------------------------------------------------------------------------------------
# Writing the landing copy
# --------------------------------------------------------------------------------------------


class _HashingWriter:
    """File-like ``write`` target that counts and hashes bytes and can enforce a byte budget."""

    def __init__(self, fh: BinaryIO, limit: int | None = None, on_limit: str = "") -> None:
        self._fh = fh
        self._limit = limit
        self._on_limit = on_limit
        self.count = 0
        self._sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.count += len(data)
        if self._limit is not None and self.count > self._limit:
            raise DeliveryRefused(self._on_limit)
        self._sha.update(data)
        return self._fh.write(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def can_copy_from_file(self) -> bool:
        return self._limit is None and hasattr(os, "copy_file_range") and _has_fd(self._fh)

    def copy_from_file(self, src_fd: int) -> int:
        """Copy a local file to the end in the kernel (copy_file_range: no trip through Python
        buffers) while a thread hashes the copied bytes of the landing copy."""
        self._fh.flush()
        dest_fd = self._fh.fileno()
        start = os.lseek(dest_fd, 0, os.SEEK_CUR)
        copied_up_to: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        hashing = threading.Thread(target=self._hash_landed, args=(dest_fd, start, copied_up_to))
        hashing.start()
        copied = 0
        try:
            while step := os.copy_file_range(src_fd, dest_fd, _KERNEL_COPY_STEP):
                copied += step
                copied_up_to.put(start + copied)
        finally:
            copied_up_to.put(None)
            hashing.join()
        self.count += copied
        return copied

    def _hash_landed(
        self, fd: int, position: int, copied_up_to: "queue.SimpleQueue[int | None]"
    ) -> None:
        while (end := copied_up_to.get()) is not None:
            while position < end:
                block = os.pread(fd, min(_COPY_CHUNK * 8, end - position), position)
                if not block:
                    return
                self._sha.update(block)
                position += len(block)


def _has_fd(fh: BinaryIO) -> bool:
    try:
        fh.fileno()
    except (OSError, AttributeError, ValueError):
        return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(dest_dir: Path, name: str) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield (fh, temp path) in ``dest_dir``; the caller renames it. Unlinked on any error."""
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            yield fh, tmp_path
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _download(folder: SourceFolder, entry: RemoteEntry, dest_dir: Path) -> tuple[int, str]:
    """Download ``entry`` to ``dest_dir/entry.name``; returns (size, sha256)."""
    with _atomic_file(dest_dir, entry.name) as (fh, tmp):
        writer = _HashingWriter(fh)
        returned = folder.fetch(entry.name, writer)  # type: ignore[arg-type]
    try:
        if writer.count != entry.size or returned != entry.size:
            raise TransientSourceError(
                f"{entry.name} from {folder.display}: got {writer.count} bytes but the listing said "
                f"{entry.size}; the file changed during download"
            )
        after = folder.stat(entry.name)
        if (after.size, after.mtime, after.kind) != (entry.size, entry.mtime, entry.kind):
            raise TransientSourceError(
                f"{entry.name} in {folder.display} changed during download "
                f"(size {entry.size} -> {after.size} bytes)"
            )
        os.replace(tmp, dest_dir / entry.name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return writer.count, writer.hexdigest()


_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def _zip_entry_parts(info: zipfile.ZipInfo, archive: str) -> list[str]:
    """Validated path components of a zip entry (DeliveryRefused when unsafe)."""
    name = info.filename
    if not name or "\x00" in name:
        raise DeliveryRefused(f"zip {archive} has an entry with an empty or NUL-containing name")
    if name.startswith(("/", "\\")):
        raise DeliveryRefused(f"zip {archive} has an absolute entry name {name!r}")
    if _DRIVE_RE.match(name):
        raise DeliveryRefused(f"zip {archive} has an entry name with a drive letter {name!r}")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise DeliveryRefused(
            f"zip {archive} has an entry escaping its folder {name!r} (path traversal)"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DeliveryRefused(f"zip {archive} has a symlink entry {name!r}")
    if info.flag_bits & 0x1:
        raise DeliveryRefused(f"zip {archive} has an encrypted entry {name!r}")
    return parts


def _extract_zip(
    zip_path: Path,
    archive: str,
    dest_dir: Path,
    *,
    max_entries: int,
    max_bytes: int,
    warnings: list[Issue],
    require_manifest: bool = True,
) -> dict[str, tuple[int, str]]:
    """Extract the CSVs of a delivery zip into ``dest_dir``; returns name -> (size, sha256)."""
    try:
        return _extract_zip_entries(
            zip_path,
            archive,
            dest_dir,
            max_entries=max_entries,
            max_bytes=max_bytes,
            warnings=warnings,
            require_manifest=require_manifest,
        )
    except DeliveryRefused as exc:
        exc.file = exc.file or archive
        raise


def _extract_zip_entries(
    zip_path: Path,
    archive: str,
    dest_dir: Path,
    *,
    max_entries: int,
    max_bytes: int,
    warnings: list[Issue],
    require_manifest: bool,
) -> dict[str, tuple[int, str]]:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            if len(infos) > max_entries:
                raise DeliveryRefused(
                    f"zip {archive} has {len(infos)} entries, more than the limit of {max_entries}"
                )
            declared = sum(i.file_size for i in infos)
            if declared > max_bytes:
                raise DeliveryRefused(
                    f"zip {archive} declares {declared} uncompressed bytes, more than the limit of "
                    f"{max_bytes}"
                )
            selected: list[tuple[zipfile.ZipInfo, list[str]]] = []
            skipped: list[str] = []
            for info in infos:
                parts = _zip_entry_parts(info, archive)
                if info.is_dir() or not parts:
                    continue
                if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
                    continue
                if not parts[-1].lower().endswith(".csv"):
                    skipped.append(info.filename)
                    continue
                selected.append((info, parts))
            if skipped:
                warnings.append(
                    file_warning(
                        archive, f"zip {archive}: ignored non-CSV entries: {_names(skipped)}"
                    )
                )
            if not selected:
                raise DeliveryRefused(f"zip {archive} contains no CSV files")
            depths = {len(p) for _, p in selected}
            folders = {p[0] for _, p in selected if len(p) > 1}
            if not (depths == {1} or (depths == {2} and len(folders) == 1)):
                raise DeliveryRefused(
                    f"zip {archive}: CSV files must all be at the zip root or all inside one "
                    f"single folder; found {_names(i.filename for i, _ in selected)}"
                )
            names = [p[-1] for _, p in selected]
            _refuse_case_duplicates(names, f"zip {archive}", archive)
            if require_manifest and not any(n.lower() == "manifest.csv" for n in names):
                raise DeliveryRefused(f"zip {archive} does not contain manifest.csv")

            over_cap = (
                f"zip {archive} expands to more than the limit of {max_bytes} uncompressed bytes "
                "(its headers under-declare the sizes)"
            )
            landed: dict[str, tuple[int, str]] = {}
            budget = max_bytes
            for info, parts in selected:
                name = parts[-1]
                with _atomic_file(dest_dir, name) as (fh, tmp):
                    writer = _HashingWriter(fh, limit=budget, on_limit=over_cap)
                    with zf.open(info) as src:
                        while chunk := src.read(_COPY_CHUNK):
                            writer.write(chunk)
                    if writer.count != info.file_size:
                        raise DeliveryRefused(
                            f"zip {archive}: entry {info.filename!r} expanded to {writer.count} bytes "
                            f"but declares {info.file_size}"
                        )
                os.replace(tmp, dest_dir / name)
                budget -= writer.count
                landed[name] = (writer.count, writer.hexdigest())
            return landed
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise DeliveryRefused(f"{archive} is not a valid zip archive: {exc}") from None


def delivery_fingerprint(files: dict[str, str]) -> str:
    """sha256 over ``name NUL sha256 LF`` for each (name, sha256) pair in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode("utf-8") + b"\x00" + files[name].encode("ascii") + b"\n")
    return h.hexdigest()


def land_delivery(
    spec: SourceSpec,
    landing_dir: Path,
    *,
    stability_window_s: float = 2.0,
    zip_max_entries: int = 64,
    zip_max_uncompressed_bytes: int = 20 * 1024**3,
    require_manifest: bool = True,
) -> LandedDelivery:
    """Copy the current delivery of ``spec`` into ``landing_dir`` (which must not exist yet).

    See the module docstring for the delivery, zip, stability, password and atomicity rules.
    """
    source = parse_source(spec)
    landing_dir = Path(landing_dir)
    if landing_dir.exists() or landing_dir.is_symlink():
        raise IntakeError(
            f"landing directory {landing_dir} already exists; refusing to overwrite it"
        )
    parent = landing_dir.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    warnings: list[Issue] = []
    partial: Path | None = None
    scratch: Path | None = None
    display = source.display
    try:
        with _open_folder(spec, source) as folder:
            display = folder.display
            plan = _classify(folder.list_entries(), folder.display, require_manifest)
            if stability_window_s > 0:
                time.sleep(stability_window_s)
            entries = folder.list_entries()
            watched = {n: (e.size, e.mtime) for n, e in _relevant(entries, folder.display).items()}
            _check_stable(plan.watched, watched, stability_window_s, folder.display)
            plan = _classify(entries, folder.display, require_manifest)
            for names, what in ((plan.ignored, "ignored files"), (plan.markers, _STALE_MARKERS)):
                if names:
                    about = names[0] if len(names) == 1 else folder.display
                    message = f"{what} in {folder.display}: {_names(names)}"
                    warnings.append(file_warning(about, message))

            partial = Path(tempfile.mkdtemp(prefix=f".{landing_dir.name}.partial-", dir=parent))
            os.chmod(partial, 0o700)
            digests: dict[str, tuple[int, str]] = {}
            if plan.archive is None:
                for entry in plan.csvs:
                    digests[entry.name] = _download(folder, entry, partial)
                archive_name = None
            else:
                archive_name = plan.archive.name
                scratch = Path(tempfile.mkdtemp(prefix=f".{landing_dir.name}.zip-", dir=parent))
                _download(folder, plan.archive, scratch)
                digests = _extract_zip(
                    scratch / archive_name,
                    archive_name,
                    partial,
                    max_entries=zip_max_entries,
                    max_bytes=zip_max_uncompressed_bytes,
                    warnings=warnings,
                    require_manifest=require_manifest,
                )
        redacted = {
            name: redact.redact_passwords(partial / name)
            for name in digests
            if redact.is_users_file(name)
        }
        if not any(name.lower() == MANIFEST_NAME for name in digests):
            where = f"zip {archive_name}" if archive_name else display
            warnings.append(
                file_warning(
                    MANIFEST_NAME,
                    f"{NO_MANIFEST_WARNING} ({where}): its files were unchanged for "
                    f"{stability_window_s:g} s and are read as complete (bulk) files",
                )
            )
        _fsync_dir(partial)
        if landing_dir.exists() or landing_dir.is_symlink():
            raise IntakeError(
                f"landing directory {landing_dir} appeared during intake; not overwriting it"
            )
        os.rename(partial, landing_dir)
        partial = None
        _fsync_dir(parent)
    except BaseException as exc:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, DeliveryRefused):
            exc.file = exc.file or display
            exc.warnings = list(warnings)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    files = {
        name: LandedFile(
            name=name,
            path=landing_dir / name,
            size=size,
            sha256=sha,
            passwords_redacted=redacted.get(name, 0),
        )
        for name, (size, sha) in sorted(digests.items())
    }
    fingerprint = delivery_fingerprint({n: f.sha256 for n, f in files.items()})
    log.info(
        "landed %d file(s) from %s source into %s (fingerprint %s)",
        len(files),
        source.kind,
        landing_dir,
        fingerprint[:12],
    )
    return LandedDelivery(
        directory=landing_dir,
        files=files,
        source_kind=source.kind,
        archive_name=archive_name,
        fingerprint=fingerprint,
        warnings=[w.message for w in warnings],
        issues=warnings,
        manifest=any(name.lower() == MANIFEST_NAME for name in files),
    )
