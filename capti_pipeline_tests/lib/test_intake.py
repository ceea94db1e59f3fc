"""land_delivery / parse_source / observe_delivery against real local folders and real zips."""

import hashlib
import io
import os
import stat
import struct
import threading
import time
import zipfile
from pathlib import Path

import pytest

from capti_pipeline.lib import intake
from capti_pipeline.lib.intake import (
    DeliveryNotReady,
    DeliveryRefused,
    IntakeError,
    LandedDelivery,
    PermanentSourceError,
    SourceSpec,
    TransientSourceError,
    land_delivery,
    observe_delivery,
    parse_source,
)

WINDOW = 0.2

# Synthetic roster content (no real people); CRLF, quotes and non-ASCII to prove byte identity.
DELIVERY: dict[str, bytes] = {
    "manifest.csv": b"propertyName,value\r\nmanifest.version,1.0\r\noneroster.version,1.2\r\n",
    "orgs.csv": b'sourcedId,name,type\r\norg-1,"Lincoln ""Elementary""",school\r\n',
    "users.csv": "sourcedId,givenName,familyName\r\nu-1,Zoë,Ñúñez\r\nu-2,Amir,O'Neil\r\n".encode(),
    "enrollments.csv": b"sourcedId,classSourcedId,userSourcedId,role\n"
    + b"e-%d,c-1,u-1,student\n" * 2000,
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_loose(folder: Path, files: dict[str, bytes] = DELIVERY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def zip_bytes(entries: dict[str, bytes] | list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in items:
            zf.writestr(name, data)
    return buf.getvalue()


def write_zip(folder: Path, entries, name: str = "roster.zip") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(zip_bytes(entries))
    return folder


def leftovers(parent: Path) -> list[str]:
    """Partial/scratch directories or temp files left next to landing dirs."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def assert_landed(result: LandedDelivery, landing: Path, expected: dict[str, bytes]) -> None:
    assert result.directory == landing
    assert sorted(result.files) == sorted(expected)
    assert stat.S_IMODE(landing.stat().st_mode) == 0o700
    assert sorted(p.name for p in landing.iterdir()) == sorted(expected)  # no temp files, no zip
    for name, data in expected.items():
        lf = result.files[name]
        assert lf.name == name
        assert lf.path == landing / name
        assert lf.path.read_bytes() == data
        assert lf.size == len(data)
        assert lf.sha256 == sha(data)
        assert stat.S_IMODE(lf.path.stat().st_mode) == 0o600
    assert result.fingerprint == intake.delivery_fingerprint(
        {n: sha(d) for n, d in expected.items()}
    )
    assert leftovers(landing.parent) == []


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(source folder, landing dir path) — the landing dir does not exist yet."""
    src = tmp_path / "drop"
    src.mkdir()
    landing_parent = tmp_path / "landing"
    landing_parent.mkdir()
    return src, landing_parent / "d1-2026-01-01"


def land(src: Path, landing: Path, **kw) -> LandedDelivery:
    kw.setdefault("stability_window_s", WINDOW)
    return land_delivery(SourceSpec(url=str(src)), landing, **kw)


# ---------------------------------------------------------------------------- parse_source


def test_parse_source_local_and_sftp() -> None:
    assert parse_source(SourceSpec("/data/drop")).kind == "local"
    assert parse_source(SourceSpec("file:///data/drop")).path == "/data/drop"
    p = parse_source(SourceSpec("sftp://capti@sftp.example.org:2222/in/d1/", "k", "kh"))
    assert (p.kind, p.host, p.port, p.username, p.path) == (
        "sftp",
        "sftp.example.org",
        2222,
        "capti",
        "/in/d1",
    )
    assert p.display == "sftp://capti@sftp.example.org:2222/in/d1"
    assert (
        parse_source(SourceSpec("sftp://capti@h/in", password_env="PW", known_hosts_path="kh")).port
        == 22
    )


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://capti@h/in",
        "sftp://h/in",  # no user
        "sftp://capti@:22/in",  # no host
        "sftp://capti@h:99999/in",
        "sftp://capti@h:abc/in",
        "sftp://capti@h",  # no folder
        "sftp://capti@h/in?x=1",
        "file://otherhost/in",
    ],
)
def test_parse_source_rejects_malformed(url: str) -> None:
    with pytest.raises(PermanentSourceError):
        parse_source(SourceSpec(url, "k", "kh"))


def test_parse_source_never_echoes_a_password_in_the_url() -> None:
    with pytest.raises(PermanentSourceError) as ei:
        parse_source(SourceSpec("sftp://capti:hunter2secret@h/in", "k", "kh"))
    assert "hunter2secret" not in str(ei.value)
    assert "password_env" in str(ei.value)


def test_parse_source_sftp_needs_known_hosts_and_credentials() -> None:
    with pytest.raises(PermanentSourceError, match="known_hosts"):
        parse_source(SourceSpec("sftp://capti@h:2222/in", sftp_key_path="k"))
    with pytest.raises(PermanentSourceError, match="sftp_key_path"):
        parse_source(SourceSpec("sftp://capti@h:2222/in", known_hosts_path="kh"))


# ---------------------------------------------------------------------------- loose local deliveries


def test_local_loose_delivery_lands_byte_identical_private_copy(dirs) -> None:
    src, landing = dirs
    write_loose(src)
    (src / "readme.txt").write_text("not roster data")
    (src / ".users.csv.part").write_bytes(b"stale leftover")
    (src / "archive").mkdir()
    (src / "archive" / "old.csv").write_text("x")

    result = land(src, landing)

    assert_landed(result, landing, DELIVERY)
    assert result.source_kind == "local"
    assert result.archive_name is None
    assert any("readme.txt" in w for w in result.warnings)
    assert any(".users.csv.part" in w for w in result.warnings)
    # the source is left untouched
    assert (src / "users.csv").read_bytes() == DELIVERY["users.csv"]


def test_manifest_name_is_case_insensitive_and_names_are_kept(dirs) -> None:
    src, landing = dirs
    files = {"MANIFEST.CSV": DELIVERY["manifest.csv"], "Users.csv": DELIVERY["users.csv"]}
    write_loose(src, files)
    result = land(src, landing)
    assert_landed(result, landing, files)


def test_landing_dir_must_not_exist(dirs) -> None:
    src, landing = dirs
    write_loose(src)
    landing.mkdir()
    with pytest.raises(IntakeError, match="already exists"):
        land(src, landing)


def test_missing_local_folder_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentSourceError, match="does not exist"):
        land(tmp_path / "nope", tmp_path / "landing" / "x")
    assert not (tmp_path / "landing" / "x").exists()
    assert leftovers(tmp_path / "landing") == []


def test_empty_folder_is_not_ready(dirs) -> None:
    src, landing = dirs
    with pytest.raises(DeliveryNotReady, match="empty"):
        land(src, landing)
    assert not landing.exists()


def test_only_part_files_is_not_ready(dirs) -> None:
    src, landing = dirs
    (src / "users.csv.filepart").write_bytes(b"uploading")
    with pytest.raises(DeliveryNotReady, match=r"users\.csv\.filepart"):
        land(src, landing)


def test_missing_manifest_is_not_ready(dirs) -> None:
    src, landing = dirs
    write_loose(src, {k: v for k, v in DELIVERY.items() if k != "manifest.csv"})
    with pytest.raises(DeliveryNotReady, match=r"manifest\.csv not present yet"):
        land(src, landing)
    assert not landing.exists()
    assert leftovers(landing.parent) == []


def _grow_during(path: Path, seconds: float) -> threading.Thread:
    def grow() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with open(path, "ab") as fh:
                fh.write(b"u-9,more,rows\r\n" * 50)
            time.sleep(0.02)

    t = threading.Thread(target=grow, daemon=True)
    t.start()
    return t


def test_file_growing_during_stability_window_is_not_ready(dirs) -> None:
    src, landing = dirs
    write_loose(src)
    t = _grow_during(src / "users.csv", 3 * WINDOW)
    try:
        with pytest.raises(DeliveryNotReady, match=r"users\.csv changed size"):
            land(src, landing)
    finally:
        t.join()
    assert not landing.exists()
    assert leftovers(landing.parent) == []


def test_upload_marker_changing_during_window_is_not_ready(dirs) -> None:
    src, landing = dirs
    write_loose(src)
    marker = src / ".enrollments.csv.part"
    marker.write_bytes(b"")
    t = _grow_during(marker, 3 * WINDOW)
    try:
        with pytest.raises(DeliveryNotReady, match=r"\.enrollments\.csv\.part"):
            land(src, landing)
    finally:
        t.join()


def test_file_appearing_or_touched_during_window_is_not_ready(dirs) -> None:
    src, landing = dirs
    write_loose(src)

    def later(fn) -> threading.Thread:
        t = threading.Thread(target=lambda: (time.sleep(WINDOW / 4), fn()), daemon=True)
        t.start()
        return t

    t = later(lambda: (src / "demographics.csv").write_bytes(b"sourcedId\n"))
    with pytest.raises(DeliveryNotReady, match=r"demographics\.csv appeared"):
        land(src, landing)
    t.join()

    st = (src / "orgs.csv").stat()
    t = later(lambda: os.utime(src / "orgs.csv", (st.st_atime, st.st_mtime + 5)))
    with pytest.raises(DeliveryNotReady, match=r"orgs\.csv was modified"):
        land(src, landing)
    t.join()
    assert not landing.exists()


class _ChangingFolder(intake.LocalFolder):
    """A real local folder whose file is appended to right after it has been copied."""

    def fetch(self, name, fh):
        n = super().fetch(name, fh)
        with open(os.path.join(self.path, name), "ab") as out:
            out.write(b"late,row\n")
        return n


def test_file_changing_during_download_is_transient(dirs) -> None:
    src, landing = dirs
    write_loose(src)
    folder = _ChangingFolder(str(src))
    entry = folder.stat("users.csv")
    dest = landing.parent / "scratch"
    dest.mkdir()
    with pytest.raises(TransientSourceError, match=r"users\.csv .*changed during download"):
        intake._download(folder, entry, dest)
    assert list(dest.iterdir()) == []  # temp file removed


def test_observe_delivery_lists_watched_files_without_copying(dirs) -> None:
    src, _ = dirs
    write_loose(src)
    (src / "readme.txt").write_text("x")
    (src / ".users.csv.part").write_bytes(b"abc")
    (src / "sub").mkdir()
    seen = observe_delivery(SourceSpec(url=str(src)))
    assert sorted(seen) == sorted([*DELIVERY, ".users.csv.part"])
    assert seen["users.csv"] == (len(DELIVERY["users.csv"]), (src / "users.csv").stat().st_mtime)
    assert observe_delivery(SourceSpec(url=str(src))) == seen
    with pytest.raises(PermanentSourceError):
        observe_delivery(SourceSpec(url=str(src / "missing")))


# ---------------------------------------------------------------------------- ambiguous deliveries


def test_loose_csvs_and_zip_together_are_refused(dirs) -> None:
    src, landing = dirs
    write_loose(src)
    write_zip(src, DELIVERY, "roster.zip")
    with pytest.raises(DeliveryRefused, match=r"ambiguous.*users\.csv.*roster\.zip"):
        land(src, landing)
    assert not landing.exists()
    assert leftovers(landing.parent) == []


def test_several_zips_are_refused(dirs) -> None:
    src, landing = dirs
    write_zip(src, DELIVERY, "a.zip")
    write_zip(src, DELIVERY, "b.ZIP")
    with pytest.raises(DeliveryRefused, match=r"several zip archives \(a\.zip, b\.ZIP\)"):
        land(src, landing)


def test_names_differing_only_by_case_are_refused(dirs) -> None:
    src, landing = dirs
    write_loose(src)
    (src / "Users.csv").write_bytes(b"other")
    with pytest.raises(DeliveryRefused, match="differ only by letter case"):
        land(src, landing)


# ---------------------------------------------------------------------------- zip deliveries


def test_zip_at_root_and_in_single_subfolder_land_like_loose(tmp_path: Path) -> None:
    loose_src = write_loose(tmp_path / "loose")
    loose = land(loose_src, tmp_path / "out" / "loose")

    root_src = write_zip(tmp_path / "zroot", DELIVERY, "OneRoster.zip")
    at_root = land(root_src, tmp_path / "out" / "zroot")

    sub_entries = [(zipfile.ZipInfo("export/"), b"")] + [
        (f"export/{n}", d) for n, d in DELIVERY.items()
    ]
    sub_entries += [("__MACOSX/export/._users.csv", b"junk"), ("export/notes.txt", b"hi")]
    sub_src = write_zip(tmp_path / "zsub", sub_entries, "export.zip")
    in_sub = land(sub_src, tmp_path / "out" / "zsub")

    for result, landing in (
        (at_root, tmp_path / "out" / "zroot"),
        (in_sub, tmp_path / "out" / "zsub"),
    ):
        assert_landed(result, landing, DELIVERY)
        assert result.fingerprint == loose.fingerprint
        assert {n: f.sha256 for n, f in result.files.items()} == {
            n: f.sha256 for n, f in loose.files.items()
        }
    assert at_root.archive_name == "OneRoster.zip"
    assert in_sub.archive_name == "export.zip"
    assert any("notes.txt" in w for w in in_sub.warnings)
    assert leftovers(tmp_path / "out") == []  # the zip is not kept next to the landing dirs


def _symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("users.csv")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _forged_small_sizes(data: bytes) -> bytes:
    """Rewrite every entry's declared uncompressed size (local + central headers) to 10 bytes."""
    out = bytearray(data)
    pos = 0
    while (pos := out.find(b"PK\x03\x04", pos)) != -1:
        struct.pack_into("<I", out, pos + 22, 10)
        pos += 4
    pos = 0
    while (pos := out.find(b"PK\x01\x02", pos)) != -1:
        struct.pack_into("<I", out, pos + 24, 10)
        pos += 4
    return bytes(out)


UNSAFE_ZIPS = {
    "traversal": ([*DELIVERY.items(), ("../evil.csv", b"x")], {}, "path traversal"),
    "nested traversal": ([*DELIVERY.items(), ("a/../../evil.csv", b"x")], {}, "path traversal"),
    "backslash traversal": ([*DELIVERY.items(), ("..\\evil.csv", b"x")], {}, "path traversal"),
    "absolute": ([*DELIVERY.items(), ("/tmp/evil.csv", b"x")], {}, "absolute"),
    "drive letter": ([*DELIVERY.items(), ("C:/evil.csv", b"x")], {}, "drive letter"),
    "symlink": (
        [("manifest.csv", DELIVERY["manifest.csv"]), (_symlink_entry(), b"/etc/passwd")],
        {},
        "symlink",
    ),
    "too many entries": (
        [*DELIVERY.items()] + [(f"x{i}.csv", b"") for i in range(10)],
        {"zip_max_entries": 8},
        "entries",
    ),
    "zip bomb": (
        [("manifest.csv", DELIVERY["manifest.csv"]), ("users.csv", b"\0" * 4_000_000)],
        {"zip_max_uncompressed_bytes": 1_000_000},
        "declares",
    ),
    "no manifest": ([("users.csv", b"a\n")], {}, "manifest"),
    "mixed layout": ([("manifest.csv", b"a\n"), ("sub/users.csv", b"a\n")], {}, "single folder"),
    "two folders": ([("a/manifest.csv", b"a\n"), ("b/users.csv", b"a\n")], {}, "single folder"),
    "too deep": ([("a/b/manifest.csv", b"a\n")], {}, "single folder"),
    "duplicate case": (
        [("manifest.csv", b"a\n"), ("users.csv", b"a\n"), ("USERS.csv", b"b\n")],
        {},
        "letter case",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_ZIPS))
def test_unsafe_or_invalid_zip_is_refused(tmp_path: Path, case: str) -> None:
    entries, caps, message = UNSAFE_ZIPS[case]
    src = write_zip(tmp_path / "drop", entries)
    landing = tmp_path / "landing" / "d1"
    with pytest.raises(DeliveryRefused, match=message):
        land(src, landing, **caps)
    assert not landing.exists()
    assert leftovers(tmp_path / "landing") == []
    assert not (tmp_path / "evil.csv").exists()
    assert not (tmp_path / "landing" / "evil.csv").exists()


def test_zip_with_under_declared_sizes_is_refused(tmp_path: Path) -> None:
    data = zip_bytes([("manifest.csv", DELIVERY["manifest.csv"]), ("users.csv", b"\0" * 3_000_000)])
    src = tmp_path / "drop"
    src.mkdir()
    (src / "roster.zip").write_bytes(_forged_small_sizes(data))
    landing = tmp_path / "landing" / "d1"
    # the declared total (20 bytes) is under the cap; the streamed bytes are not trusted blindly
    with pytest.raises(DeliveryRefused):
        land(src, landing, zip_max_uncompressed_bytes=1_000_000)
    assert not landing.exists()
    assert leftovers(tmp_path / "landing") == []


def test_garbage_zip_is_refused(dirs) -> None:
    src, landing = dirs
    (src / "roster.zip").write_bytes(b"this is not a zip file" * 100)
    with pytest.raises(DeliveryRefused, match="not a valid zip"):
        land(src, landing)
    assert leftovers(landing.parent) == []


def test_streaming_byte_counter_enforces_the_cap(tmp_path: Path) -> None:
    """zipfile itself stops at the declared size; the counter is the second line of defence."""
    with open(tmp_path / "out.bin", "wb") as fh:
        writer = intake._HashingWriter(fh, limit=10, on_limit="over the cap")
        writer.write(b"0123456789")
        with pytest.raises(DeliveryRefused, match="over the cap"):
            writer.write(b"x")
    assert (tmp_path / "out.bin").read_bytes() == b"0123456789"


# ---------------------------------------------------------------------------- report material


def test_refusals_name_their_file_and_carry_the_warnings_before_them(dirs) -> None:
    src, landing = dirs
    (src / "readme.txt").write_text("hello")
    write_zip(src, {**DELIVERY, "../evil.csv": b"x"}, "roster.zip")
    with pytest.raises(DeliveryRefused) as refused:
        land(src, landing)
    assert refused.value.file == "roster.zip"
    [warning] = refused.value.warnings
    assert (warning.severity, warning.file, warning.line) == ("warning", "readme.txt", 0)

    (src / "roster.zip").unlink()
    write_loose(src)
    write_zip(src, DELIVERY, "other.zip")
    with pytest.raises(DeliveryRefused) as refused:
        land(src, landing)
    assert refused.value.file == str(src)


def test_warnings_are_report_issues(dirs) -> None:
    src, landing = dirs
    write_zip(src, {**DELIVERY, "notes.txt": b"x"}, "roster.zip")
    (src / "readme.txt").write_text("x")
    (src / "a.pdf").write_text("x")
    result = land(src, landing)
    assert [(i.severity, i.file, i.line) for i in result.issues] == [
        ("warning", str(src), 0),  # two ignored files: the folder
        ("warning", "roster.zip", 0),
    ]
    assert [i.message for i in result.issues] == result.warnings
    assert "a.pdf, readme.txt" in result.warnings[0] and "notes.txt" in result.warnings[1]


# ---------------------------------------------------------------------------- without manifest


def test_loose_csvs_without_manifest_are_taken_when_not_required(dirs) -> None:
    src, landing = dirs
    files = {n: d for n, d in DELIVERY.items() if n != "manifest.csv"}
    write_loose(src, files)
    with pytest.raises(DeliveryNotReady, match=r"manifest\.csv not present yet"):
        land(src, landing)
    result = land(src, landing, require_manifest=False)
    assert_landed(result, landing, files)
    assert result.manifest is False
    [warning] = result.issues
    assert (warning.file, warning.severity) == ("manifest.csv", "warning")
    assert warning.message.startswith(intake.NO_MANIFEST_WARNING)


def test_zip_without_manifest_is_taken_when_not_required(tmp_path: Path) -> None:
    files = {n: d for n, d in DELIVERY.items() if n != "manifest.csv"}
    src = write_zip(tmp_path / "drop", files)
    with pytest.raises(DeliveryRefused, match=r"does not contain manifest\.csv"):
        land(src, tmp_path / "landing" / "a")
    result = land(src, tmp_path / "landing" / "b", require_manifest=False)
    assert sorted(result.files) == sorted(files) and result.manifest is False
    assert "zip roster.zip" in result.issues[0].message


# ---------------------------------------------------------------------------- passwords


USERS_WITH_PASSWORDS = (
    b"\xef\xbb\xbfsourcedId,givenName,password,email\r\n"
    b'u-1,"Zo\xc3\xab, Ann",Hunter2-Secret,"zoe@x.example"\r\n'
    b'u-2,Amir,"multi\r\nline",amir@x.example\r\n'
    b"u-3,Lee,,lee@x.example\r\n"
)
USERS_REDACTED = (
    b"\xef\xbb\xbfsourcedId,givenName,password,email\r\n"
    b'u-1,"Zo\xc3\xab, Ann",,"zoe@x.example"\r\n'
    b'u-2,Amir,"\r\n",amir@x.example\r\n'
    b"u-3,Lee,,lee@x.example\r\n"
)


@pytest.mark.parametrize("layout", ["loose", "zip"])
def test_landed_users_csv_has_no_passwords_but_records_what_was_delivered(
    tmp_path: Path, layout: str
) -> None:
    files = {**DELIVERY, "users.csv": USERS_WITH_PASSWORDS}
    src = tmp_path / "drop"
    if layout == "loose":
        write_loose(src, files)
    else:
        write_zip(src, files)
    landing = tmp_path / "landing" / "d1"
    result = land(src, landing)
    users = result.files["users.csv"]
    assert users.path.read_bytes() == USERS_REDACTED
    assert (users.size, users.sha256) == (len(USERS_WITH_PASSWORDS), sha(USERS_WITH_PASSWORDS))
    assert users.passwords_redacted == result.passwords_redacted == 2
    assert result.fingerprint == intake.delivery_fingerprint({n: sha(d) for n, d in files.items()})
    assert stat.S_IMODE(users.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in landing.iterdir()) == sorted(files)  # no temp file left
    assert leftovers(landing.parent) == []
    for name, data in files.items():  # every other file byte for byte
        if name != "users.csv":
            assert result.files[name].path.read_bytes() == data
