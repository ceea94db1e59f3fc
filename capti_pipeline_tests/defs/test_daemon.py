"""A real `dagster-daemon` on the project's dagster.yaml and workspace.yaml: the Import Now sensor
launches a run through the queued run coordinator and the run applies the delivery."""

import os
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from capti_pipeline.lib import operations
from capti_pipeline.lib import store as st
from capti_pipeline.resources import store_engine
from capti_pipeline_tests.defs.conftest import PROJECT_ROOT, VENV_BIN, ProjectHome, stop_daemon
from capti_pipeline_tests.support.harness import EDFI

# daemon start → sensor tick → queued → launched → finished (override on a slow CI machine)
RUN_WAIT_S = float(os.environ.get("CAPTI_TEST_DAEMON_WAIT_S", "90"))
LINK_WAIT_S = 30  # at most two more import_now_sensor ticks (15 s) to link the request


def _log_tail(path: Path, lines: int = 80) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no daemon log)"
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow
def test_daemon_runs_import_now_through_the_queue(project_home: ProjectHome) -> None:
    home = project_home
    done = home.cli("district", "add", "d1", "--source", str(EDFI))
    assert done.returncode == 0, done.stdout + done.stderr
    done = home.cli("import-now", "d1", "--by", "daemon-test")
    assert done.returncode == 0 and "import-now #1 queued" in done.stdout, done.stdout + done.stderr

    log = home.root / "daemon.log"
    with log.open("wb") as sink:
        daemon = subprocess.Popen(
            [str(VENV_BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=PROJECT_ROOT,
            env=home.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so cleanup never touches others
        )
    try:
        run = _wait_for_finished_run(home, daemon, log)
        assert run.status == dg.DagsterRunStatus.SUCCESS, _log_tail(log)
        status = _wait_for_request_status(home, log)
    finally:
        code = stop_daemon(daemon)
    assert code == 0, _log_tail(log)

    assert status == "applied"
    assert run.tags["dagster/partition"] == "d1"  # what the one-run-per-district limit keys on
    assert run.tags["dagster/sensor_name"] == "import_now_sensor"
    assert run.tags["dagster/run_key"] == "import-now:1"
    assert run.tags["capti/import_request"] == "1"
    with dg.DagsterInstance.from_config(str(home.dagster_home)) as instance:
        enqueued = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED)
        assert enqueued, "the run did not go through the queued run coordinator"
        assert len(instance.get_run_records()) == 1  # exactly one run for the one request
    shown = home.status("d1")
    assert (shown["state"], shown["last_result"], shown["running"]) == ("applied", "applied", False)
    assert shown["import_requests"][0]["status"] == "applied"
    assert shown["counts"]["users"]["create"] == 10


def _wait_for_finished_run(
    home: ProjectHome, daemon: subprocess.Popen[bytes], log: Path
) -> dg.DagsterRun:
    deadline = time.monotonic() + RUN_WAIT_S
    with dg.DagsterInstance.from_config(str(home.dagster_home)) as instance:
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                pytest.fail(f"dagster-daemon exited with {daemon.returncode}:\n{_log_tail(log)}")
            records = instance.get_run_records(
                dg.RunsFilter(tags={"capti/import_request": "1"}), limit=1
            )
            if records and records[0].dagster_run.is_finished:
                return records[0].dagster_run
            time.sleep(1)
        state = records[0].dagster_run.status if records else "no run yet"
    pytest.fail(f"no finished run after {RUN_WAIT_S}s ({state}); daemon log:\n{_log_tail(log)}")


def _wait_for_request_status(home: ProjectHome, log: Path) -> str:
    engine = store_engine(home.database_url)
    deadline = time.monotonic() + LINK_WAIT_S
    status = "?"
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            status = operations.request_status(conn, operations.get_request(conn, 1))
            district = st.get_district(conn, "d1")
        if status not in ("queued", "running"):
            return status
        time.sleep(1)
    pytest.fail(
        f"request still {status} (district {district.state}) after the run; daemon log:\n"
        + _log_tail(log)
    )
