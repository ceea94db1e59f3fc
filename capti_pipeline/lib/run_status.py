"""Reconcile the roster store's run records with how the Dagster run actually ended.

The assets record every outcome they reach themselves; what they cannot record is their own
death (a crash outside their try blocks, a killed worker, a run that failed or was canceled
before its first step). Those runs would otherwise stay "running" forever, so the failure
sensor, `service.outcome_of` and `capti-sync status` all come through here.
"""

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from capti_pipeline.lib import report as rp
from capti_pipeline.lib import store as st

RUNNING = "running"
# Kinds that are Dagster runs (approve/undo run inside the CLI process, not in Dagster).
DAGSTER_KINDS = ("sync", "dry_run")


@dataclass(frozen=True)
class RecordedFailure:
    district_id: str
    reason: str
    notify: bool


def record_dagster_failure(
    engine: Engine,
    run_id: str,
    message: str,
    *,
    district_id: str | None = None,
    trigger: str = "dagster",
) -> RecordedFailure | None:
    """Mark a run that died while 'running' as failed; outcomes already recorded are kept.

    A run that failed before its first asset wrote anything has no record yet: with its
    `district_id` (the run's partition) a failed record is created, so the district's status
    and an Import Now request linked to the run show the failure too.
    """
    reason = f"run failed: {message}"[:2000]
    with engine.begin() as conn:
        run = st.get_run(conn, run_id)
        if run is None:
            if district_id is None or not _district_exists(conn, district_id):
                return None
            st.record_run_start(conn, run_id, district_id, kind="sync", trigger=trigger)
            run = st.get_run(conn, run_id)
            assert run is not None
        if run.state != RUNNING:
            return RecordedFailure(run.district_id, run.reason or run.state, notify=False)
        report = rp.build_report(
            district_id=run.district_id, run_id=run_id, state=rp.FAILED, issues=[], reason=reason
        )
        st.record_run_end(conn, run_id, state=rp.FAILED, reason=reason, report=report)
    return RecordedFailure(run.district_id, reason, notify=True)


def _district_exists(conn: sa.Connection, district_id: str) -> bool:
    return (
        conn.execute(sa.select(st.districts.c.id).where(st.districts.c.id == district_id)).first()
        is not None
    )


def running_dagster_runs(engine: Engine) -> list[st.RunRecord]:
    """Records that still say running and belong to Dagster runs."""
    with engine.connect() as conn:
        run_ids = conn.execute(
            sa.select(st.sync_runs.c.run_id).where(
                st.sync_runs.c.state == RUNNING, st.sync_runs.c.kind.in_(DAGSTER_KINDS)
            )
        ).scalars()
        records = [st.get_run(conn, run_id) for run_id in list(run_ids)]
    return [r for r in records if r is not None]


def fail_dead_runs(
    engine: Engine, why_dead: Callable[[st.RunRecord], str | None]
) -> list[RecordedFailure]:
    """Record as failed every 'running' record whose Dagster run is over.

    `why_dead(record)` answers from the Dagster instance: None while the run is alive (queued,
    starting, started), else a message such as "the Dagster run was canceled".
    """
    failures = []
    for record in running_dagster_runs(engine):
        message = why_dead(record)
        if message is None:
            continue
        failure = record_dagster_failure(engine, record.run_id, message)
        if failure is not None and failure.notify:
            failures.append(failure)
    return failures
