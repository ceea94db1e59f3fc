"""The automation as deployed: one real `dagster-daemon` on the project's dagster.yaml and
workspace.yaml, for one night of five districts.

- `nightly_roster_sync` is ticked by the daemon's scheduler at the last 2 AM (Eastern) tick and
  launches one run per active, unpaused district; evaluated again (a tick interrupted by a daemon
  crash is resumed), Dagster's scheduler launches nothing new: the run keys are taken.
- One run per district: two Import Now runs of one district, queued in the same sensor tick
  (and that district's nightly run), wait for each other in the QueuedRunCoordinator (tag limit
  on `dagster/partition`), while two other districts' nightly runs are in progress together.
- `sync_run_failure_sensor`, evaluated by the daemon, records a run that failed outside the
  assets' own error handling (an SFTP server refusing every connection, retried, then failed) in
  the roster store, and the webhook receives it.

The daemon is started once for the module; every test reads what that night left behind.
"""

import itertools
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.remote_representation.external import RemoteSchedule, RemoteSensor
from dagster._core.scheduler.instigation import (
    InstigatorState,
    InstigatorStatus,
    ScheduleInstigatorData,
    TickStatus,
)
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster._daemon.daemon import SchedulerDaemon  # noqa: F401  (loads the scheduler module)
from dagster._scheduler.scheduler import launch_scheduled_runs
from dagster._utils.schedules import cron_string_iterator

from capti_pipeline.lib import operations
from capti_pipeline.lib import store as st
from capti_pipeline.lib.generator import DistrictSpec, generate_district, write_delivery
from capti_pipeline.resources import store_engine
from capti_pipeline_tests.defs.conftest import (
    PROJECT_ROOT,
    VENV_BIN,
    ProjectHome,
    make_project_home,
    stop_daemon,
)
from capti_pipeline_tests.support.harness import EDFI
from capti_pipeline_tests.support.webhook import closed_port, start_receiver

pytestmark = pytest.mark.slow

# daemon start → schedule tick and sensors → queue → runs (one district's two runs in a row) →
# failure sensor (run-status sensors are evaluated about every 30 s). Override on a slow machine.
NIGHT_WAIT_S = float(os.environ.get("CAPTI_TEST_DAEMON_NIGHT_WAIT_S", "300"))
SCHEDULE = "nightly_roster_sync"
FAILURE_SENSOR = "sync_run_failure_sensor"
SYNCED = ("d1", "d2", "d3", "down")  # active, unpaused: the schedule runs them
EASTERN_CRON, EASTERN = "0 2 * * *", "America/New_York"
# d1 and d2: runs long enough (seconds of work each) to be seen in progress together.
STUDENTS = 3000


@dataclass
class Night:
    home: ProjectHome
    instance: dg.DagsterInstance
    workspace: WorkspaceProcessContext
    schedule: RemoteSchedule
    failure_sensor: RemoteSensor
    first_tick: datetime  # the last 2 AM tick before the daemon started
    received: list[dict] = field(default_factory=list)
    daemon_log: Path | None = None

    def runs(self, **tags: str) -> list[dg.DagsterRun]:
        records = self.instance.get_run_records(dg.RunsFilter(tags=tags))
        return [r.dagster_run for r in records]

    def ticks(self) -> list:
        return self.instance.get_ticks(
            self.schedule.get_remote_origin_id(), self.schedule.selector_id
        )

    def tick(self):
        """The night's tick. (Should a 2 AM pass while the test runs, the daemon evaluates only
        the latest missed tick; a later one is left out of this night.)"""
        return min(self.ticks(), key=lambda t: t.timestamp)

    def nightly_runs(self) -> dict[str, dg.DagsterRun]:
        ticks = self.ticks()
        if not ticks:
            return {}
        tick_date = datetime.fromtimestamp(self.tick().timestamp, UTC).astimezone(
            operations.EASTERN
        )
        suffix = f":{tick_date.date().isoformat()}"
        runs = [
            r
            for r in self.runs(**{"dagster/schedule_name": SCHEDULE})
            if r.tags["dagster/run_key"].endswith(suffix)
        ]
        by_district = {r.tags["dagster/partition"]: r for r in runs}
        assert len(by_district) == len(runs), [r.tags for r in runs]
        return by_district

    def pressed_runs(self) -> list[dg.DagsterRun]:
        """The two Import Now runs of d3, by launch time."""
        runs = [r for r in self.runs() if r.tags.get("capti/import_request") in ("1", "2")]
        return sorted(runs, key=lambda r: _launched_at(self, r) if r.is_finished else 0)

    def store_run(self, run_id: str) -> st.RunRecord | None:
        with store_engine(self.home.database_url).connect() as conn:
            return st.get_run(conn, run_id)

    def log_tail(self, lines: int = 80) -> str:
        path = self.daemon_log
        text = path.read_text(errors="replace") if path and path.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def last_nightly_tick(now: datetime) -> datetime:
    """The latest 2 AM Eastern tick at or before `now`, from Dagster's own cron iterator."""
    last = None
    for tick in cron_string_iterator((now - timedelta(days=2)).timestamp(), EASTERN_CRON, EASTERN):
        if tick > now:
            assert last is not None
            return last
        last = tick
    raise AssertionError("unreachable")


def _register(home: ProjectHome, instance: dg.DagsterInstance, root: Path) -> None:
    """Five districts, written to the store as `capti-sync district add` would (partitions
    included): d1 and d2 with real deliveries, d3 with a small one; quiet is paused; gone was
    removed; down's SFTP server refuses every connection."""
    engine = store_engine(home.database_url)
    known_hosts = root / "known_hosts"
    known_hosts.write_text("")
    with engine.begin() as conn:
        for district_id, seed in (("d1", 1), ("d2", 2)):
            spec = DistrictSpec(district_id=district_id, students=STUDENTS, seed=seed)
            drop = write_delivery(generate_district(spec), root / "drop" / district_id)
            st.upsert_district(conn, district_id, source_url=str(drop), active=True)
        for district_id in ("d3", "quiet", "gone"):
            st.upsert_district(conn, district_id, source_url=str(EDFI), active=True)
        st.upsert_district(
            conn,
            "down",
            source_url=f"sftp://capti@127.0.0.1:{closed_port()}/drop",
            known_hosts_path=str(known_hosts),
            password_env="CAPTI_TEST_SFTP_PASSWORD",
            active=True,
        )
        operations.pause(conn, "quiet", None, "summer")
        st.upsert_district(conn, "gone", active=False)
        # Two Import Now presses for d3: the sensor turns both into runs in one evaluation.
        for who in ("daemon-test", "daemon-test-again"):
            operations.request_import(conn, "d3", who, datetime.now(UTC))
    instance.add_dynamic_partitions("districts", ["d1", "d2", "d3", "down", "quiet"])


def _start_schedule_before(night_tick: datetime, instance: dg.DagsterInstance, schedule) -> None:
    """The schedule has been running since just before the last 2 AM tick, so the daemon's
    scheduler evaluates exactly that tick when it starts (as if it had been up all night)."""
    instance.add_instigator_state(
        InstigatorState(
            schedule.get_remote_origin(),
            InstigatorType.SCHEDULE,
            InstigatorStatus.RUNNING,
            ScheduleInstigatorData(schedule.cron_schedule, night_tick.timestamp() - 60),
        )
    )


def _settled(night: Night) -> bool:
    """Every expected run finished, and the failed one recorded and notified."""
    nightly = night.nightly_runs()
    pressed = [r for r in night.runs() if r.tags.get("capti/import_request") in ("1", "2")]
    runs = [*nightly.values(), *pressed]
    if set(nightly) != set(SYNCED) or len(pressed) != 2:
        return False
    if not all(r.is_finished for r in runs):
        return False
    failed = night.store_run(nightly["down"].run_id)
    notified = any(m.get("run_id") == nightly["down"].run_id for m in night.received)
    return failed is not None and failed.state == "failed" and notified


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Night]:
    root = tmp_path_factory.mktemp("night")
    home = make_project_home(root / "deployed")
    received: list[dict] = []
    server = start_receiver(received)
    home.env.update(
        CAPTI_WEBHOOK_URL=f"http://127.0.0.1:{server.server_port}/hook",
        CAPTI_UI_BASE_URL="http://dagster.example:3000",
        CAPTI_TEST_SFTP_PASSWORD="never-used",
    )
    first_tick = last_nightly_tick(datetime.now(UTC))
    with pytest.MonkeyPatch.context() as patch:
        # The workspace below starts a code server from this process: it must see the same
        # store and instance as the daemon (the resources read these variables).
        for name in [n for n in os.environ if n.startswith(("CAPTI_", "DAGSTER_"))]:
            patch.delenv(name)
        for name, value in home.env.items():
            if name.startswith(("CAPTI_", "DAGSTER_")):
                patch.setenv(name, value)
        with (
            dg.DagsterInstance.from_config(str(home.dagster_home)) as instance,
            WorkspaceProcessContext(
                instance, WorkspaceFileTarget(paths=[str(PROJECT_ROOT / "workspace.yaml")])
            ) as workspace,
        ):
            location = workspace.create_request_context().get_code_location("capti_pipeline")
            [repository] = location.get_repositories().values()
            schedule = repository.get_schedule(SCHEDULE)
            _register(home, instance, root)
            _start_schedule_before(first_tick, instance, schedule)
            night = Night(
                home,
                instance,
                workspace,
                schedule,
                repository.get_sensor(FAILURE_SENSOR),
                first_tick,
                received,
                root / "daemon.log",
            )
            with night.daemon_log.open("wb") as sink:
                daemon = subprocess.Popen(
                    [str(VENV_BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                    cwd=PROJECT_ROOT,
                    env=home.env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: cleanup touches nothing else
                )
            try:
                deadline = time.monotonic() + NIGHT_WAIT_S
                while not _settled(night):
                    if daemon.poll() is not None:
                        pytest.fail(f"dagster-daemon exited:\n{night.log_tail()}")
                    if time.monotonic() > deadline:
                        runs = {
                            r.run_id: (r.tags.get("dagster/partition"), r.status)
                            for r in night.runs()
                        }
                        pytest.fail(
                            f"the night did not settle in {NIGHT_WAIT_S}s: runs {runs}, "
                            f"webhook {received}\n{night.log_tail()}"
                        )
                    time.sleep(1)
            finally:
                code = stop_daemon(daemon)
            assert code == 0, night.log_tail()
            yield night
    server.shutdown()


def _events(night: Night, run: dg.DagsterRun, event_type: dg.DagsterEventType) -> list:
    return night.instance.all_logs(run.run_id, of_type=event_type)


def _launched_at(night: Night, run: dg.DagsterRun) -> float:
    """When the queue let the run go (from then on it counts as in progress)."""
    [starting] = _events(night, run, dg.DagsterEventType.RUN_STARTING)
    return starting.timestamp


def _ended_at(night: Night, run: dg.DagsterRun) -> float:
    ends = (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE)
    [end] = [e for t in ends for e in _events(night, run, t)]
    return end.timestamp


# --- the schedule ------------------------------------------------------------------------------


def test_the_daemon_ticks_the_schedule_once_per_active_unpaused_district(night: Night) -> None:
    nightly = night.nightly_runs()
    assert sorted(nightly) == sorted(SYNCED)  # not the paused one, not the removed one
    tick = night.tick()
    assert tick.timestamp >= night.first_tick.timestamp()
    date = datetime.fromtimestamp(tick.timestamp, UTC).astimezone(operations.EASTERN)
    date = date.date().isoformat()
    for district_id, run in nightly.items():
        assert run.tags["dagster/run_key"] == f"{district_id}:{date}"
        assert run.tags["capti/trigger"] == "nightly"
        assert _events(night, run, dg.DagsterEventType.RUN_ENQUEUED), "not through the queue"
    assert nightly["d1"].status == nightly["d2"].status == dg.DagsterRunStatus.SUCCESS
    assert tick.status == TickStatus.SUCCESS
    assert sorted(tick.run_ids) == sorted(r.run_id for r in nightly.values())
    with store_engine(night.home.database_url).connect() as conn:
        assert st.get_district(conn, "d2").state == "applied"
        assert st.latest_run(conn, "quiet") is None and st.latest_run(conn, "gone") is None


def test_a_reevaluated_tick_launches_nothing_new(night: Night) -> None:
    """The daemon died in the middle of the tick (it is left STARTED): Dagster's scheduler
    evaluates the same tick again at its next start, and the run keys stop every second run."""
    before = {r.run_id for r in night.runs()}
    tick = night.tick()
    # What the instance holds when the daemon dies in the middle of the tick: the tick STARTED,
    # the schedule's iteration checkpoint not yet moved past it (it is written after the tick).
    night.instance.update_tick(tick.with_status(TickStatus.STARTED))
    state = night.instance.get_instigator_state(
        night.schedule.get_remote_origin_id(), night.schedule.selector_id
    )
    assert state is not None
    night.instance.update_instigator_state(
        state.with_data(
            ScheduleInstigatorData(night.schedule.cron_schedule, tick.timestamp - 60, None)
        )
    )
    list(
        launch_scheduled_runs(
            night.workspace,
            logging.getLogger("capti.test.scheduler"),
            datetime.now(UTC),
            iteration_times={},
        )
    )
    again = night.tick()
    assert again.tick_id == tick.tick_id and again.status == TickStatus.SUCCESS  # redone...
    assert {r.run_id for r in night.runs()} == before  # ...and nothing launched twice:
    nightly = night.nightly_runs()  # each request found its run key's existing run
    assert set(again.run_ids) == {r.run_id for r in nightly.values()}
    assert set(again.run_keys) == {r.tags["dagster/run_key"] for r in nightly.values()}
    assert sorted(night.nightly_runs()) == sorted(SYNCED)


# --- one run per district ----------------------------------------------------------------------


def test_one_run_per_district_at_a_time_but_districts_in_parallel(night: Night) -> None:
    first, second = night.pressed_runs()
    # Queued in the same sensor evaluation: the second was waiting while the first ran...
    [queued] = _events(night, second, dg.DagsterEventType.RUN_ENQUEUED)
    assert queued.timestamp < _ended_at(night, first)
    # ...yet the second left the queue only once the first had ended.
    assert _launched_at(night, second) >= _ended_at(night, first)
    # No two runs of the district were ever in progress at once (the nightly one included).
    d3 = sorted([first, second, night.nightly_runs()["d3"]], key=lambda r: _launched_at(night, r))
    for earlier, later in itertools.pairwise(d3):
        assert _launched_at(night, later) >= _ended_at(night, earlier)
    assert {r.status for r in d3} == {dg.DagsterRunStatus.SUCCESS}
    with store_engine(night.home.database_url).connect() as conn:
        outcomes = sorted(st.get_run(conn, r.run_id).state for r in d3)  # type: ignore[union-attr]
    assert outcomes == ["applied", "no_changes", "no_changes"]  # each found the last one's roster

    # Two districts did sync at the same time (queued by the same tick, no shared limit).
    d1, d2 = night.nightly_runs()["d1"], night.nightly_runs()["d2"]
    assert _launched_at(night, d2) < _ended_at(night, d1)
    assert _launched_at(night, d1) < _ended_at(night, d2)


# --- the failure sensor -------------------------------------------------------------------------


def test_the_failure_sensor_records_and_notifies_a_failed_run(night: Night) -> None:
    run = night.nightly_runs()["down"]
    assert run.status == dg.DagsterRunStatus.FAILURE
    retried = _events(night, run, dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert len(retried) == 3  # the transient SFTP fault was retried before giving up
    record = night.store_run(run.run_id)
    assert record is not None and record.state == "failed"
    assert (record.reason or "").startswith("run failed: ")  # written by the sensor
    assert "oneroster_delivery" in (record.reason or "")
    ticks = night.instance.get_ticks(
        night.failure_sensor.get_remote_origin_id(), night.failure_sensor.selector_id
    )
    assert any(run.run_id in (t.origin_run_ids or []) for t in ticks), "sensor never saw it"

    [message] = [m for m in night.received if m["run_id"] == run.run_id]
    assert (message["district"], message["state"]) == ("down", "failed")
    assert message["run_url"] == f"http://dagster.example:3000/runs/{run.run_id}"
    assert message["reason"] and message["reason"] in (record.reason or "")
    with store_engine(night.home.database_url).connect() as conn:
        assert st.get_district(conn, "down").state == "failed"
