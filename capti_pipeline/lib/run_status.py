"""Reconcile the roster store's run records with how the Dagster run actually ended.

The assets record every outcome they reach themselves; what they cannot record is their own
death (a crash outside their try blocks, a killed worker, a run that failed or was canceled
before its first step). Those runs would otherwise stay "running" forever, so the failure
sensor, `service.outcome_of` and `capti-sync status` all come through here.
"""

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from capti_pipeline.lib import report as rp
from capti_pipeline.lib import store as st

RUNNING = "running"
# Kinds that are Dagster runs, judged by how their Dagster run ended.
DAGSTER_KINDS = ("sync", "dry_run")
# Kinds that run inside the operator's `capti-sync` process, not in Dagster: judged by whether
# that process still exists (its pid and host are in the running record's report).
OPERATOR_KINDS = ("approve", "undo")


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


def process_is_gone(pid: str | int | None, host: str | None) -> bool:
    """True only when we can tell: a process of this host whose pid no longer exists.

    The same test for `capti-sync run` (Dagster run tags) and approve/undo (store record)."""
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def fail_dead_operator_runs(engine: Engine) -> list[RecordedFailure]:
    """Record as failed every approve/undo still 'running' whose `capti-sync` process is gone
    (killed: its transaction died with it, so nothing of it was applied). Records without a
    runner (written by an older version) are left alone: nothing tells whether they live."""
    with engine.connect() as conn:
        run_ids = list(
            conn.execute(
                sa.select(st.sync_runs.c.run_id).where(
                    st.sync_runs.c.state == RUNNING, st.sync_runs.c.kind.in_(OPERATOR_KINDS)
                )
            ).scalars()
        )
        records = [st.get_run(conn, run_id) for run_id in run_ids]
    failures = []
    for record in records:
        runner = (record.report or {}).get("runner") if record else None
        if not isinstance(runner, dict) or not process_is_gone(
            runner.get("pid"), runner.get("host")
        ):
            continue
        message = (
            f"the capti-sync {record.kind} process {runner['pid']} running it is gone (killed?); "
            "nothing of it was applied"
        )
        failure = record_dagster_failure(engine, record.run_id, message)
        if failure is not None and failure.notify:
            failures.append(failure)
    return failures
