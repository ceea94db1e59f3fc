"""The 2 AM America/New_York schedule against a real Dagster instance, including the DST days.

Expected tick times come from Dagster's own cron iterator, not from our reading of the rules.
"""

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from dagster._utils.schedules import cron_string_iterator

from capti_pipeline.defs.schedules import nightly_roster_sync
from capti_pipeline.lib import operations
from capti_pipeline.lib import store as st
from capti_pipeline.resources import RosterStore
from capti_pipeline_tests.support.harness import EDFI, CaptiEnv

EASTERN = ZoneInfo("America/New_York")
CRON, TZ = "0 2 * * *", "America/New_York"


def dagster_ticks(start: datetime, end: datetime) -> list[datetime]:
    """Dagster's own tick times in [start, end)."""
    ticks = []
    for tick in cron_string_iterator(start.timestamp(), CRON, TZ):
        if tick >= end:
            return ticks
        ticks.append(tick)
    raise AssertionError("unreachable")


def ticks_on(day: date) -> list[datetime]:
    """Dagster's ticks whose Eastern calendar date is `day`."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=EASTERN)
    around = dagster_ticks(midnight - timedelta(days=1), midnight + timedelta(days=2))
    return [t for t in around if t.astimezone(EASTERN).date() == day]


def evaluate(env: CaptiEnv, scheduled: datetime) -> list[dg.RunRequest] | dg.SkipReason:
    context = dg.build_schedule_context(
        instance=env.instance,
        scheduled_execution_time=scheduled,
        resources={"roster_store": RosterStore(database_url=env.database_url)},
    )
    return nightly_roster_sync(context)


@pytest.fixture
def three_districts(capti_env: CaptiEnv) -> CaptiEnv:
    """d1 and d2 active; gone was removed (inactive) and must never be scheduled."""
    for district_id in ("d1", "d2", "gone"):
        capti_env.register(district_id, EDFI)
    with capti_env.engine().begin() as conn:
        st.upsert_district(conn, "gone", active=False)
    return capti_env


def test_schedule_definition() -> None:
    assert nightly_roster_sync.cron_schedule == CRON
    assert nightly_roster_sync.execution_timezone == TZ
    assert nightly_roster_sync.default_status == dg.DefaultScheduleStatus.RUNNING
    assert nightly_roster_sync.job_name == "roster_sync_job"


def test_normal_night_one_run_per_active_district(three_districts: CaptiEnv) -> None:
    [tick] = ticks_on(date(2026, 5, 12))
    assert tick.astimezone(UTC) == datetime(2026, 5, 12, 6, 0, tzinfo=UTC)  # 02:00 EDT

    requests = evaluate(three_districts, tick)
    assert [r.partition_key for r in requests] == ["d1", "d2"]
    assert [r.run_key for r in requests] == ["d1:2026-05-12", "d2:2026-05-12"]
    assert all(r.tags["capti/trigger"] == "nightly" for r in requests)
    # A re-evaluated tick (daemon restart, retry) asks for the same run keys: Dagster never
    # launches a run key twice, so no district runs twice that night.
    assert [r.run_key for r in evaluate(three_districts, tick)] == [r.run_key for r in requests]
    # The next night gets new keys.
    [next_tick] = ticks_on(date(2026, 5, 13))
    assert [r.run_key for r in evaluate(three_districts, next_tick)] == [
        "d1:2026-05-13",
        "d2:2026-05-13",
    ]


def test_spring_forward_2am_does_not_exist_tick_at_3am_edt(three_districts: CaptiEnv) -> None:
    day = date(2026, 3, 8)
    ticks = ticks_on(day)
    # Dagster fires once, at 03:00 EDT (= 07:00 UTC, where 02:00 EST would have been).
    assert len(ticks) == 1
    local = ticks[0].astimezone(EASTERN)
    assert (local.hour, local.minute, local.utcoffset()) == (3, 0, timedelta(hours=-4))
    assert ticks[0].astimezone(UTC) == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)
    assert operations.next_nightly_run(datetime(2026, 3, 7, 12, 0, tzinfo=EASTERN)) == ticks[0]

    requests = evaluate(three_districts, ticks[0])
    assert [r.run_key for r in requests] == ["d1:2026-03-08", "d2:2026-03-08"]
    # The nights around it are ordinary.
    for neighbour in (date(2026, 3, 7), date(2026, 3, 9)):
        [tick] = ticks_on(neighbour)
        assert tick.astimezone(EASTERN).hour == 2


def test_fall_back_one_tick_at_2am_est(three_districts: CaptiEnv) -> None:
    day = date(2026, 11, 1)
    ticks = ticks_on(day)
    # 01:00-01:59 happens twice that night; 02:00 happens once (EST) and so does the tick.
    assert len(ticks) == 1
    local = ticks[0].astimezone(EASTERN)
    assert (local.hour, local.utcoffset()) == (2, timedelta(hours=-5))
    assert ticks[0].astimezone(UTC) == datetime(2026, 11, 1, 7, 0, tzinfo=UTC)
    # Whatever instant of the night (even inside the repeated hour) we ask from, it is that tick.
    for probe_utc in (4, 5, 5.5, 6, 6.5):
        probe = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=probe_utc)
        assert operations.next_nightly_run(probe) == ticks[0], probe

    requests = evaluate(three_districts, ticks[0])
    assert [r.run_key for r in requests] == ["d1:2026-11-01", "d2:2026-11-01"]


def test_next_nightly_run_agrees_with_dagster_for_a_year() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    # Every hour of the year plus odd minutes, so the DST hours and the ticks themselves are hit.
    probes = [start + timedelta(minutes=m) for m in range(0, 366 * 24 * 60, 60)]
    probes += [start + timedelta(minutes=m) for m in range(7, 366 * 24 * 60, 24 * 60 - 13)]
    for probe in probes:
        it = cron_string_iterator(probe.timestamp(), CRON, TZ)
        expected = next(it)
        if expected <= probe:  # the iterator includes `start` when it is a tick; ours is strict
            expected = next(it)
        ours = operations.next_nightly_run(probe)
        assert ours == expected and ours.utcoffset() == expected.utcoffset(), probe
    # One tick per Eastern calendar day all year, i.e. never two on the November day.
    days = [t.astimezone(EASTERN).date() for t in dagster_ticks(start, start + timedelta(days=365))]
    assert len(days) == len(set(days)) == 365


def test_paused_districts_are_skipped_and_resume_after_until(three_districts: CaptiEnv) -> None:
    env = three_districts
    with env.engine().begin() as conn:
        operations.pause(
            conn, "d2", date(2026, 5, 14), "summer rollover", now=datetime(2026, 5, 11, tzinfo=UTC)
        )
        operations.pause(conn, "d1", None, "contract", now=datetime(2026, 5, 11, tzinfo=UTC))
    assert isinstance(evaluate(env, ticks_on(date(2026, 5, 12))[0]), dg.SkipReason)
    assert isinstance(evaluate(env, ticks_on(date(2026, 5, 13))[0]), dg.SkipReason)

    # --until 2026-05-14 ends at 00:00 Eastern that day: the 2 AM run of the 14th happens.
    requests = evaluate(env, ticks_on(date(2026, 5, 14))[0])
    assert [r.run_key for r in requests] == ["d2:2026-05-14"]
    with env.engine().connect() as conn:
        d2 = st.get_district(conn, "d2")
        assert (d2.paused, d2.paused_until, d2.pause_reason) == (False, None, None)
        assert st.get_district(conn, "d1").paused  # no --until: stays paused until resumed

    with env.engine().begin() as conn:
        operations.resume(conn, "d1")
    requests = evaluate(env, ticks_on(date(2026, 5, 15))[0])
    assert [r.partition_key for r in requests] == ["d1", "d2"]


def test_no_districts_skips(capti_env: CaptiEnv) -> None:
    result = evaluate(capti_env, ticks_on(date(2026, 5, 12))[0])
    assert isinstance(result, dg.SkipReason)


def test_district_without_partition_gets_one_before_its_run(capti_env: CaptiEnv) -> None:
    # Registered straight in the store (no CLI), before district_discovery_sensor noticed it.
    with capti_env.engine().begin() as conn:
        st.upsert_district(conn, "fresh", source_url=str(EDFI))
    assert capti_env.instance.get_dynamic_partitions("districts") == []
    requests = evaluate(capti_env, ticks_on(date(2026, 5, 12))[0])
    assert [r.partition_key for r in requests] == ["fresh"]
    assert capti_env.instance.get_dynamic_partitions("districts") == ["fresh"]


def test_status_shows_next_run_in_eastern_time(three_districts: CaptiEnv) -> None:
    env = three_districts
    now = datetime(2026, 3, 7, 17, 0, tzinfo=UTC)
    with env.engine().begin() as conn:
        operations.pause(conn, "d2", date(2026, 3, 10), None, now=now)
        rows = {d.id: operations.district_status(conn, d, now) for d in st.list_districts(conn)}
    assert rows["d1"]["next_scheduled_run"] == "2026-03-08T03:00:00-04:00"
    assert rows["d2"]["next_scheduled_run"] == "2026-03-10T02:00:00-04:00"
    assert rows["d2"]["paused_until"] == "2026-03-10T00:00:00-04:00"
