"""Operator-facing state of districts: schedule eligibility, pause, Import Now requests, status.

Shared by the CLI, the schedule and the sensors, so every entry point follows the same rules.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from capti_pipeline.lib import store as st

EASTERN = ZoneInfo("America/New_York")
NIGHTLY_LOCAL_TIME = time(2, 0)


def next_nightly_run(after: datetime) -> datetime:
    """Next 2:00 AM America/New_York strictly after `after` (aware), as an aware datetime.

    On the March DST day 2:00 does not exist: the run happens at 3:00 EDT (what Dagster does).
    On the November day 2:00 happens twice: the run happens once, at the first (EDT) one.
    """
    local = after.astimezone(EASTERN)
    day = local.date()
    for offset in range(0, 3):
        candidate_day = day + timedelta(days=offset)
        naive = datetime.combine(candidate_day, NIGHTLY_LOCAL_TIME)
        # fold=0: a non-existent wall time maps forward by the gap, an ambiguous one to its first.
        candidate = naive.replace(tzinfo=EASTERN).astimezone(UTC).astimezone(EASTERN)
        if candidate > local:
            return candidate
    raise AssertionError("unreachable")


def nightly_run_key(district_id: str, scheduled: datetime) -> str:
    """One nightly run per district and Eastern calendar date, however often a tick is evaluated."""
    return f"{district_id}:{scheduled.astimezone(EASTERN).date().isoformat()}"


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def resume_expired_pauses(conn: Connection, now: datetime) -> list[str]:
    """Districts whose `--until` has passed are resumed (automatically, and recorded)."""
    now = _naive_utc(now)
    rows = conn.execute(
        sa.select(st.districts.c.id).where(
            st.districts.c.paused.is_(True),
            st.districts.c.paused_until.is_not(None),
            st.districts.c.paused_until <= now,
        )
    ).scalars()
    resumed = list(rows)
    for district_id in resumed:
        conn.execute(
            st.districts.update()
            .where(st.districts.c.id == district_id)
            .values(paused=False, paused_until=None, pause_reason=None)
        )
    return resumed


def districts_due(conn: Connection, now: datetime) -> list[st.District]:
    """Registered, active, unpaused districts (after auto-resuming expired pauses)."""
    resume_expired_pauses(conn, now)
    return [d for d in st.list_districts(conn) if not d.paused]


def pause(conn: Connection, district_id: str, until: date | None, reason: str | None) -> None:
    st.get_district(conn, district_id)
    until_dt = datetime.combine(until, time(0, 0), tzinfo=EASTERN) if until else None
    conn.execute(
        st.districts.update()
        .where(st.districts.c.id == district_id)
        .values(
            paused=True,
            paused_until=_naive_utc(until_dt) if until_dt else None,
            pause_reason=reason,
        )
    )


def resume(conn: Connection, district_id: str) -> None:
    st.get_district(conn, district_id)
    conn.execute(
        st.districts.update()
        .where(st.districts.c.id == district_id)
        .values(paused=False, paused_until=None, pause_reason=None)
    )


@dataclass(frozen=True)
class ImportRequest:
    id: int
    district_id: str
    requested_by: str
    requested_at: datetime
    state: str
    detail: str | None
    dagster_run_id: str | None


def request_import(conn: Connection, district_id: str, requested_by: str, now: datetime) -> ImportRequest:
    """Record an Import Now press; a paused district's request is refused on the spot."""
    district = st.get_district(conn, district_id)
    resume_expired_pauses(conn, now)
    district = st.get_district(conn, district_id)
    state, detail = "pending", None
    if district.paused:
        state = "refused"
        detail = "district is paused" + (f": {district.pause_reason}" if district.pause_reason else "")
    result = conn.execute(
        st.import_requests.insert().values(
            district_id=district_id,
            requested_by=requested_by,
            requested_at=_naive_utc(now),
            state=state,
            detail=detail,
        )
    )
    request_id = int(result.inserted_primary_key[0])
    return get_request(conn, request_id)


def get_request(conn: Connection, request_id: int) -> ImportRequest:
    row = conn.execute(
        sa.select(st.import_requests).where(st.import_requests.c.id == request_id)
    ).one()
    values = dict(row._mapping)
    values.pop("taken_at", None)
    return ImportRequest(**values)


def pending_requests(conn: Connection) -> list[ImportRequest]:
    rows = conn.execute(
        sa.select(st.import_requests.c.id)
        .where(st.import_requests.c.state == "pending")
        .order_by(st.import_requests.c.id)
    ).scalars()
    return [get_request(conn, request_id) for request_id in rows]


def mark_request(conn: Connection, request_id: int, state: str, detail: str | None = None, dagster_run_id: str | None = None) -> None:
    values: dict[str, Any] = {"state": state}
    if detail is not None:
        values["detail"] = detail
    if dagster_run_id is not None:
        values["dagster_run_id"] = dagster_run_id
    if state == "taken":
        values["taken_at"] = _naive_utc(datetime.now(UTC))
    conn.execute(
        st.import_requests.update().where(st.import_requests.c.id == request_id).values(**values)
    )


def request_status(conn: Connection, request: ImportRequest) -> str:
    """queued → running → applied / no_changes / failed / held / refused, as the admin page shows."""
    if request.state in ("pending", "refused"):
        return "queued" if request.state == "pending" else "refused"
    if request.dagster_run_id is None:
        return "queued"
    run = st.get_run(conn, request.dagster_run_id)
    return run.state if run else "queued"


def district_status(conn: Connection, district: st.District, now: datetime) -> dict[str, Any]:
    last = st.latest_run(conn, district.id)
    last_finished = st.latest_run(
        conn, district.id, states=["applied", "no_changes", "refused", "held", "failed", "not_ready", "dry_run"]
    )
    nxt = None if district.paused and not district.paused_until else next_nightly_run(now)
    if district.paused and district.paused_until:
        resume_at = district.paused_until.replace(tzinfo=UTC)
        nxt = next_nightly_run(max(now, resume_at) - timedelta(seconds=1))
    return {
        "district": district.id,
        "name": district.name,
        "state": district.state,
        "detail": district.state_detail,
        "paused": district.paused,
        "paused_until": district.paused_until.isoformat() if district.paused_until else None,
        "pause_reason": district.pause_reason,
        "adds_only": district.adds_only,
        "held": bool(last and last.state == "held"),
        "last_run_id": last.run_id if last else None,
        "last_run_state": last.state if last else None,
        "last_finished_at": (
            last_finished.finished_at.replace(tzinfo=UTC).isoformat()
            if last_finished and last_finished.finished_at
            else None
        ),
        "last_result": last_finished.state if last_finished else None,
        "counts": last_finished.counts if last_finished else {},
        "next_scheduled_run": nxt.isoformat() if nxt else None,
    }
