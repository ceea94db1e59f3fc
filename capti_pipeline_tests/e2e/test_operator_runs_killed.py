"""`kill -9` of a real `capti-sync approve` / `capti-sync undo` process in the middle of its apply:
the open transaction dies with it, `capti-sync status` records the run as failed instead of
"running" forever, and the operator can simply run the command again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capti_pipeline import cli
from capti_pipeline.lib import store as st
from capti_pipeline.lib.generator import (
    DistrictSpec,
    generate_district,
    remove_students,
    write_delivery,
)
from capti_pipeline_tests.support.harness import CaptiEnv

FAILPOINT = "apply:after-users"  # users written in the open transaction, the rest not yet


def start_paused(env: CaptiEnv, *argv: str) -> subprocess.Popen[bytes]:
    """`capti-sync ARGV` in its own process, paused inside its apply transaction."""
    marker = env.root / "paused-in-apply"
    marker.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "capti_pipeline.cli", *argv],
        env={**os.environ, "CAPTI_FAILPOINT": FAILPOINT, "CAPTI_FAILPOINT_MARKER": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(process.stdout.read().decode() if process.stdout else "exited")
        assert time.monotonic() < deadline, "the command never reached its apply"
        time.sleep(0.05)
    assert int(marker.read_text()) == process.pid
    return process


def kill(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)  # reaped: its pid no longer exists
    assert process.returncode == -signal.SIGKILL


def status(capsys: pytest.CaptureFixture[str], district_id: str) -> dict:
    capsys.readouterr()
    assert cli.main(["status", district_id, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def runs_of_kind(env: CaptiEnv, district_id: str, kind: str) -> list[st.RunRecord]:
    with env.engine().connect() as conn:
        return [r for r in st.list_runs(conn, district_id) if r.kind == kind]


@pytest.fixture
def district(capti_env: CaptiEnv) -> tuple[CaptiEnv, Path]:
    spec = DistrictSpec(district_id="op", students=300, students_per_school=100, seed=4)
    full = generate_district(spec)
    drop = capti_env.root / "drop"
    write_delivery(full, drop)
    capti_env.register("op", drop)
    assert capti_env.run("op").state == "applied"
    shrunk, _ = remove_students(full, 0.3, seed=1)  # over the 10 % archive rule: held
    for path in drop.iterdir():
        path.unlink()
    write_delivery(shrunk, drop)
    return capti_env, drop


def test_killed_approve_is_failed_and_the_plan_can_be_approved_again(district, capsys) -> None:
    env, _ = district
    before = env.snapshot("op")
    held = env.run("op")
    assert held.state == "held"

    process = start_paused(env, "approve", "op", "--by", "support")
    shown = status(capsys, "op")
    assert (shown["state"], shown["running"]) == ("running", True)  # alive: left alone
    kill(process)
    assert env.snapshot("op") == before  # the open transaction died with the process

    shown = status(capsys, "op")
    assert (shown["state"], shown["running"]) == ("failed", False), shown
    assert "approve process" in shown["detail"] and "is gone" in shown["detail"]
    [approve] = runs_of_kind(env, "op", "approve")
    assert approve.state == "failed"
    assert (shown["held"], shown["held_run_id"]) == (True, held.run_id)  # still pending

    capsys.readouterr()
    assert cli.main(["approve", "op", "--by", "support"]) == 0, capsys.readouterr()
    archived = [u for u in env.snapshot("op")["users"] if u["status"] == "archived"]
    assert len(archived) == held.report["counts"]["users"]["archive"] > 0
    assert status(capsys, "op")["held"] is False


def test_killed_undo_is_failed_and_the_undo_can_be_run_again(district, capsys) -> None:
    env, _ = district
    before = env.snapshot("op")
    capsys.readouterr()
    assert (
        cli.main(["district", "set", "op", "--thresholds", '{"*": {"archive": {"percent": 50}}}'])
        == 0
    )
    applied = env.run("op")
    assert applied.state == "applied"
    after = env.snapshot("op")

    process = start_paused(env, "undo", "op", "--run", applied.run_id)
    kill(process)
    assert env.snapshot("op") == after
    shown = status(capsys, "op")
    assert (shown["state"], shown["running"]) == ("failed", False), shown
    assert "undo process" in shown["detail"]
    [undo] = runs_of_kind(env, "op", "undo")
    assert undo.state == "failed"

    capsys.readouterr()
    assert cli.main(["undo", "op", "--run", applied.run_id]) == 0, capsys.readouterr()
    assert env.snapshot("op") == before
