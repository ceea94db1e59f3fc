"""`kill -9` of a real `capti-sync run` process in the middle of the apply step."""

import os
import signal
import subprocess
import sys
import time

from capti_pipeline.lib.generator import (
    DistrictSpec,
    generate_district,
    remove_students,
    rename_users,
    write_delivery,
)
from capti_pipeline_tests.support.harness import CaptiEnv


def test_kill_during_apply_leaves_the_previous_roster_and_the_next_run_completes(
    capti_env: CaptiEnv,
):
    district = generate_district(
        DistrictSpec(district_id="crash", students=600, students_per_school=200)
    )
    drop = capti_env.root / "drop"
    write_delivery(district, drop)
    capti_env.register("crash", drop)
    assert capti_env.run("crash").state == "applied"
    before = capti_env.snapshot("crash")

    night2, _ = remove_students(district, 0.05, seed=1)
    night2, _ = rename_users(night2, 0.05, seed=2)
    for path in drop.iterdir():
        path.unlink()
    write_delivery(night2, drop)

    marker = capti_env.root / "paused-in-apply"
    env = {
        **os.environ,
        # Pause after users are written (locations, classes, users rows are in the open
        # transaction; enrollments and memberships are not yet written).
        "CAPTI_FAILPOINT": "apply:after-users",
        "CAPTI_FAILPOINT_MARKER": str(marker),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "capti_pipeline.cli", "run", "crash"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        assert time.monotonic() < deadline, "the run never reached the apply step"
        time.sleep(0.05)
    assert int(marker.read_text()) == process.pid
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    assert capti_env.snapshot("crash") == before  # the open transaction died with the process

    outcome = capti_env.run("crash")  # the dead run is noticed and does not block this one
    assert outcome.state == "applied", outcome.report
    after = {u["sourcedId"]: u for u in capti_env.snapshot("crash")["users"]}
    assert (
        sum(u["status"] == "archived" for u in after.values())
        == outcome.report["counts"]["users"]["archive"]
        > 0
    )
    assert capti_env.run("crash").state == "no_changes"
