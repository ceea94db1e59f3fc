"""Helpers for driving the schedule, sensors and CLI against a real (throwaway) Dagster instance."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from capti_pipeline.resources import Notifier, RosterStore
from capti_pipeline_tests.support.harness import CaptiEnv
from capti_pipeline_tests.support.operator import cli_runner


def sensor_resources(env: CaptiEnv) -> dict[str, object]:
    return {
        "roster_store": RosterStore(database_url=env.database_url),
        "notifier": Notifier(webhook_url="", ui_base_url=""),
    }


def apply_partition_requests(instance: dg.DagsterInstance, result: object) -> None:
    """What the sensor daemon does with a SensorResult's dynamic partition requests."""
    if not isinstance(result, dg.SensorResult):
        return
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)


def run_requests(result: object) -> list[dg.RunRequest]:
    if isinstance(result, dg.SensorResult):
        return list(result.run_requests or [])
    if isinstance(result, dg.SkipReason):
        return []
    raise AssertionError(f"unexpected sensor result {result!r}")


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """`capti-sync ARGS` in this process (same env as capti_env): (exit code, stdout+stderr)."""
    return cli_runner(capsys)


@pytest.fixture
def status_json(run_cli: Callable[..., tuple[int, str]]) -> Callable[..., Any]:
    def status(*district: str) -> Any:
        code, out = run_cli("status", *district, "--json")
        assert code == 0, out
        return json.loads(out)

    return status


PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@dataclass
class ProjectHome:
    """A data dir + DAGSTER_HOME holding the project's own dagster.yaml, for subprocesses
    (CLI, dagster-daemon, dagster-webserver) that must behave as in a deployment."""

    root: Path
    env: dict[str, str]

    @property
    def dagster_home(self) -> Path:
        return Path(self.env["DAGSTER_HOME"])

    @property
    def database_url(self) -> str:
        return self.env["CAPTI_DATABASE_URL"]

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "capti-sync"), *args],
            env=self.env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen_cli(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(VENV_BIN / "capti-sync"), *args],
            env=self.env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def status(self, district_id: str) -> dict[str, Any]:
        done = self.cli("status", district_id, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)


def make_project_home(root: Path) -> ProjectHome:
    home = root / "dagster_home"
    home.mkdir(parents=True)
    shutil.copyfile(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTI_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home),
        CAPTI_DATA_DIR=str(root / "data"),
        CAPTI_DATABASE_URL=f"sqlite:///{root / 'data' / 'roster.sqlite3'}",
        CAPTI_STABILITY_WINDOW_MS="0",
        CAPTI_RETRY_WAIT_MS="0",
        CAPTI_WEBHOOK_URL="",
        CAPTI_LOG_LEVEL="ERROR",
        DAGSTER_DISABLE_TELEMETRY="yes",
        PYTHONUNBUFFERED="1",
    )
    return ProjectHome(root, env)


@pytest.fixture
def project_home(tmp_path: Path) -> ProjectHome:
    return make_project_home(tmp_path / "deployed")


def stop_daemon(daemon: subprocess.Popen[bytes]) -> int:
    """SIGTERM is the daemon's clean shutdown; its process group (code server, run workers)
    is killed only if it does not stop in time."""
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        raise
