"""Intake through the real Dagster job: passwords never stay on disk, intake refusals and
warnings reach the report, zip limits are configurable, deliveries without manifest.csv."""

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from capti_pipeline import cli
from capti_pipeline.lib import report as rp
from capti_pipeline.lib.intake import NO_MANIFEST_WARNING, delivery_fingerprint
from capti_pipeline.lib.validate import validate_delivery
from capti_pipeline_tests.fixtures.deliveries import PII_VALUES, Delivery, baseline
from capti_pipeline_tests.support.harness import CaptiEnv

PASSWORDS = tuple(v for v in PII_VALUES if v.startswith("Pw!"))
MULTILINE = 'Kestrel-9\nsecond line, "quoted"'  # a quoted password spanning two lines


def _with_tricky_passwords(version: str = "1.1") -> Delivery:
    delivery = baseline(version)
    delivery.set("users.csv", "0072", "password", MULTILINE)
    delivery.line_end = "\r\n"
    return delivery


def _secrets() -> list[bytes]:
    return [p.encode() for p in (*PASSWORDS, "Kestrel-9", "second line")]


def _files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


def _assert_no_password_anywhere(env: CaptiEnv, outcome) -> None:
    data_dir = Path(os.environ["CAPTI_DATA_DIR"])
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    store = Path(env.database_url.removeprefix("sqlite:///"))
    assert store.is_file() and store.is_relative_to(data_dir)
    files = _files_under(data_dir, dagster_home)
    assert any(p.name == "users.csv" for p in files)  # the landing copy is there...
    for path in files:
        data = path.read_bytes()
        for secret in _secrets():
            assert secret not in data, (path, secret)  # ...without a single password
    for text in (
        json.dumps(outcome.report),
        rp.to_csv(outcome.report),
        rp.to_markdown(outcome.report),
    ):
        for secret in _secrets():
            assert secret.decode() not in text


def _landing(env: CaptiEnv, district: str, run_id: str) -> Path:
    return Path(os.environ["CAPTI_DATA_DIR"]) / "landing" / district / run_id


def _assert_validates_like(delivered: Path, landed: Path) -> None:
    a, b = validate_delivery(delivered), validate_delivery(landed)
    assert [i.one_line() for i in b.issues] == [i.one_line() for i in a.issues]
    assert (b.version, b.modes, b.rows_read) == (a.version, a.modes, a.rows_read)
    for name, frame in a.frames.items():
        pd.testing.assert_frame_equal(b.frames[name], frame)


def _delivery_metadata(env: CaptiEnv, run_id: str) -> dict:
    records = env.instance.fetch_materializations(dg.AssetKey("oneroster_delivery"), limit=10)
    [record] = [r for r in records.records if r.run_id == run_id]
    metadata = record.asset_materialization.metadata
    return {key: value.value for key, value in metadata.items()}


def _fingerprint(files: dict[str, bytes]) -> str:
    return delivery_fingerprint({n: hashlib.sha256(d).hexdigest() for n, d in files.items()})


@pytest.mark.parametrize("channel", ["loose", "zip"])
def test_passwords_leave_no_trace_and_validation_is_unchanged(
    capti_env: CaptiEnv, tmp_path: Path, channel: str
) -> None:
    delivery = _with_tricky_passwords()
    delivered = delivery.write(tmp_path / "delivered")  # outside CAPTI_DATA_DIR
    drop = tmp_path / "drop"
    if channel == "loose":
        delivery.write(drop)
    else:
        delivery.write_zip(drop / "maple.zip")
    capti_env.register("pw", drop)
    outcome = capti_env.run("pw")
    assert (outcome.state, outcome.exit_code) == ("applied", 0), outcome.report
    assert len(capti_env.snapshot("pw")["users"]) == 8

    _assert_no_password_anywhere(capti_env, outcome)
    _assert_validates_like(delivered, _landing(capti_env, "pw", outcome.run_id))
    meta = _delivery_metadata(capti_env, outcome.run_id)
    assert meta["passwords_redacted"] == 8
    assert meta["fingerprint"] == _fingerprint(delivery.contents())  # what was delivered
    assert "| users.csv |" in meta["files"] and "| 8 |" in meta["files"]


@pytest.mark.sftp
@pytest.mark.parametrize("layout", ["loose", "zip"])
def test_passwords_delivered_over_sftp_leave_no_trace(
    capti_env: CaptiEnv, sshd_server, tmp_path: Path, layout: str
) -> None:
    delivery = _with_tricky_passwords("1.2")
    folder = sshd_server.root / f"pw-{layout}"
    if layout == "loose":
        delivery.write(folder)
    else:
        delivery.write_zip(folder / "maple.zip")
    os.chmod(folder, 0o700)
    capti_env.register(
        f"pw-{layout}",
        sshd_server.url(folder.name),
        sftp_key=str(sshd_server.client_key_path),
        known_hosts=str(sshd_server.known_hosts_path),
    )
    outcome = capti_env.run(f"pw-{layout}")
    assert (outcome.state, outcome.exit_code) == ("applied", 0), outcome.report
    _assert_no_password_anywhere(capti_env, outcome)
    delivered = delivery.write(tmp_path / "delivered")
    _assert_validates_like(delivered, _landing(capti_env, f"pw-{layout}", outcome.run_id))
    meta = _delivery_metadata(capti_env, outcome.run_id)
    assert (meta["passwords_redacted"], meta["source_kind"]) == (8, "sftp")
    assert meta["fingerprint"] == _fingerprint(delivery.contents())


# -- intake refusals and warnings in the report ------------------------------------------------


def _zip_with(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_intake_refusal_is_a_file_level_error_with_the_warnings_before_it(
    capti_env: CaptiEnv, tmp_path: Path, capsys
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    contents = baseline().contents()
    (drop / "roster.zip").write_bytes(_zip_with({**contents, "../../evil.csv": b"x"}))
    (drop / "readme.txt").write_text("hello")
    capti_env.register("zipbad", drop)
    outcome = capti_env.run("zipbad")
    assert (outcome.state, outcome.exit_code) == ("refused", 2)
    report = outcome.report
    assert (report["error_count"], report["warning_count"]) == (1, 1)
    [warning, error] = report["issues"]
    assert (warning["severity"], warning["file"], warning["line"]) == ("warning", "readme.txt", 0)
    assert "ignored files" in warning["message"]
    assert (error["severity"], error["file"], error["line"]) == ("error", "roster.zip", 0)
    assert "'../../evil.csv' (path traversal)" in error["message"]
    assert report["reason"] == "delivery refused: 1 file-level error in roster.zip"

    capsys.readouterr()
    assert cli.main(["report", "zipbad", "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "severity,file,line,column,sourcedId,message"
    assert rows[1].startswith("warning,readme.txt,,,,ignored files in ")
    assert rows[2].startswith("error,roster.zip,,,,zip roster.zip has an entry escaping its folder")


def test_ambiguous_folder_is_refused_naming_the_folder(capti_env: CaptiEnv, tmp_path: Path) -> None:
    drop = baseline().write(tmp_path / "drop")
    (drop / "extra.zip").write_bytes(_zip_with(baseline().contents()))
    capti_env.register("mixed", drop)
    outcome = capti_env.run("mixed")
    assert (outcome.state, outcome.exit_code) == ("refused", 2)
    [error] = outcome.report["issues"]
    assert (error["severity"], error["file"]) == ("error", str(drop))
    assert "both loose CSV files" in error["message"]
    assert outcome.report["error_count"] == 1


def test_intake_warnings_reach_applied_and_held_reports(
    capti_env: CaptiEnv, tmp_path: Path
) -> None:
    drop = baseline().write(tmp_path / "drop")
    (drop / "notes.pdf").write_bytes(b"%PDF")
    (drop / ".users.csv.part").write_bytes(b"left over")  # stable: a stale upload marker
    capti_env.register("warned", drop)
    applied = capti_env.run("warned")
    assert applied.state == "applied", applied.report
    warnings = {(i["file"], i["severity"]) for i in applied.report["issues"]}
    assert {("notes.pdf", "warning"), (".users.csv.part", "warning")} <= warnings
    assert applied.report["warning_count"] >= 2

    held_delivery = baseline()
    for sid in ("0071", "0072", "0073"):  # 3 of 8 users leave: more than the 10 % rule
        held_delivery.remove_row("users.csv", sid)
    held_delivery.write(drop)
    (drop / "notes.pdf").write_bytes(b"%PDF")
    held = capti_env.run("warned")
    assert (held.state, held.exit_code) == ("held", 3), held.report
    assert ("notes.pdf", "warning") in {(i["file"], i["severity"]) for i in held.report["issues"]}


# -- zip limits from the environment -----------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CAPTI_ZIP_MAX_ENTRIES", "3", "entries, more than the limit of 3"),
        ("CAPTI_ZIP_MAX_UNCOMPRESSED_BYTES", "1000", "more than the limit of 1000"),
    ],
)
def test_configured_zip_limits_are_enforced_by_the_job(
    capti_env: CaptiEnv, tmp_path: Path, monkeypatch, variable: str, value: str, message: str
) -> None:
    drop = tmp_path / "drop"
    baseline().write_zip(drop / "maple.zip")
    capti_env.register("capped", drop)
    assert capti_env.run("capped").state == "applied"  # within the default limits

    monkeypatch.setenv(variable, value)
    before = capti_env.snapshot("capped")
    outcome = capti_env.run("capped")
    assert (outcome.state, outcome.exit_code) == ("refused", 2)
    [error] = outcome.report["issues"]
    assert error["file"] == "maple.zip" and message in error["message"]
    assert capti_env.snapshot("capped") == before


# -- deliveries without manifest.csv ----------------------------------------------------------


def _without_manifest(delivery: Delivery, drop: Path) -> Path:
    delivery.write(drop)
    (drop / "manifest.csv").unlink()
    return drop


def test_a_district_without_manifests_is_synced_with_a_warning(
    capti_env: CaptiEnv, tmp_path: Path
) -> None:
    drop = _without_manifest(baseline(), tmp_path / "drop")
    capti_env.register("nomanifest", drop)
    first = capti_env.run("nomanifest")
    assert (first.state, first.exit_code) == ("applied", 0), first.report
    [warning] = [i for i in first.report["issues"] if i["message"].startswith(NO_MANIFEST_WARNING)]
    assert (warning["severity"], warning["file"]) == ("warning", "manifest.csv")
    assert len(capti_env.snapshot("nomanifest")["users"]) == 8

    nightly = baseline().set("users.csv", "0071", "familyName", "Renamed")
    _without_manifest(nightly, drop)
    second = capti_env.run("nomanifest")  # its last applied delivery had none: taken again
    assert second.state == "applied", second.report
    users = {u["sourcedId"]: u for u in capti_env.snapshot("nomanifest")["users"]}
    assert users["0071"]["familyName"] == "Renamed"


def test_a_district_that_used_a_manifest_waits_for_one(capti_env: CaptiEnv, tmp_path: Path) -> None:
    drop = baseline().write(tmp_path / "drop")
    capti_env.register("withmanifest", drop)
    assert capti_env.run("withmanifest").state == "applied"
    before = capti_env.snapshot("withmanifest")

    _without_manifest(baseline().set("users.csv", "0071", "familyName", "Early"), drop)
    waiting = capti_env.run("withmanifest")
    assert (waiting.state, waiting.exit_code) == ("not_ready", 0)
    assert "manifest.csv not present yet" in waiting.report["reason"]
    assert capti_env.snapshot("withmanifest") == before

    baseline().set("users.csv", "0071", "familyName", "Early").write(drop)  # manifest arrives
    assert capti_env.run("withmanifest").state == "applied"
