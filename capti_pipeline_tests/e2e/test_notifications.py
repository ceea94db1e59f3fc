"""Failed, refused and held runs notify a webhook with district, reason and a link to the run."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from capti_pipeline.lib.generator import DistrictSpec, generate_district, write_delivery
from capti_pipeline_tests.support.harness import CaptiEnv
from capti_pipeline_tests.support.webhook import closed_port, start_receiver


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict]]]:
    received: list[dict] = []
    server = start_receiver(received)
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def test_refused_and_held_runs_are_notified(
    capti_env: CaptiEnv, receiver, monkeypatch, tmp_path: Path
):
    url, received = receiver
    monkeypatch.setenv("CAPTI_WEBHOOK_URL", url)
    monkeypatch.setenv("CAPTI_UI_BASE_URL", "http://dagster.example:3000")
    district = generate_district(DistrictSpec(district_id="hook", students=100))
    drop = tmp_path / "drop"
    write_delivery(district, drop)
    capti_env.register("hook", drop)
    assert capti_env.run("hook").state == "applied"
    assert received == []  # successful runs are quiet

    (drop / "users.csv").write_bytes(b"\xff\xfe not utf-8")
    refused = capti_env.run("hook")
    assert refused.state == "refused"
    [message] = received
    assert message["district"] == "hook" and message["state"] == "refused"
    assert "users.csv" in message["reason"]
    assert message["run_url"] == f"http://dagster.example:3000/runs/{refused.run_id}"

    write_delivery(district, drop)
    lines = (drop / "users.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (drop / "users.csv").write_text("".join(lines[:10]), encoding="utf-8")
    held = capti_env.run("hook")
    assert held.state == "held"
    assert received[-1]["state"] == "held" and received[-1]["run_id"] == held.run_id
    assert "users archive" in received[-1]["reason"]
    # No personal data in what leaves the building.
    names = set(district.frames["users"]["familyName"])
    assert not any(name in json.dumps(received) for name in names)


def test_failed_runs_are_notified(capti_env: CaptiEnv, receiver, monkeypatch, tmp_path: Path):
    url, received = receiver
    monkeypatch.setenv("CAPTI_WEBHOOK_URL", url)
    monkeypatch.setenv("CAPTI_UI_BASE_URL", "http://dagster.example:3000")

    # The district's folder disappeared: the intake step records the failure itself.
    drop = tmp_path / "drop"
    write_delivery(generate_district(DistrictSpec(district_id="gone", students=20)), drop)
    capti_env.register("gone", drop)
    shutil.rmtree(drop)
    failed = capti_env.run("gone")
    assert (failed.state, failed.exit_code) == ("failed", 1)
    [message] = received
    assert (message["district"], message["state"], message["run_id"]) == (
        "gone",
        "failed",
        failed.run_id,
    )
    assert message["run_url"] == f"http://dagster.example:3000/runs/{failed.run_id}"
    assert message["reason"] == failed.report["reason"]

    # The SFTP server refuses every connection: retried, then the step fails outside the
    # asset's own handling; the failure is recorded and notified all the same.
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    monkeypatch.setenv("CAPTI_TEST_SFTP_PASSWORD", "not-used")
    capti_env.register(
        "down",
        f"sftp://capti@127.0.0.1:{closed_port()}/drop",
        known_hosts=str(known_hosts),
        password_env="CAPTI_TEST_SFTP_PASSWORD",
    )
    down = capti_env.run("down")
    assert (down.state, down.exit_code) == ("failed", 1), down.report
    assert len(received) == 2
    assert (received[-1]["district"], received[-1]["state"], received[-1]["run_id"]) == (
        "down",
        "failed",
        down.run_id,
    )
    assert received[-1]["reason"] and received[-1]["reason"] in down.report["reason"]
    assert capti_env.snapshot("down")["users"] == []
