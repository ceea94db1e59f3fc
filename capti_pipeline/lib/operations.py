"""Operator-facing state of districts: schedule eligibility, pause, Import Now requests, status.

Shared by the CLI, the schedule and the sensors, so every entry point follows the same rules.
Dagster-free: the callers pass in what they learned from the Dagster instance.

Times are stored as naive UTC (like the rest of the roster store) and shown in America/New_York.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from capti_pipeline.lib import report as rp
from capti_pipeline.lib import store as st

EASTERN = ZoneInfo("America/New_York")
NIGHTLY_LOCAL_TIME = time(2, 0)
NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "America/New_York"

# Import request rows: pending (not yet seen by the sensor) → taken (a run was requested) |
# refused (paused/removed district). What the admin page shows is derived by request_status().
PENDING, TAKEN, REFUSED = "pending", "taken", "refused"
QUEUED, RUNNING = "queued", "running"
_FINISHED_STATES = (
    rp.APPLIED,
    rp.NO_CHANGES,
    rp.REFUSED,
    rp.HELD,
    rp.FAILED,
    rp.NOT_READY,
    rp.DRY_RUN,
    rp.APPROVED,
    rp.DISCARDED,
    rp.SUPERSEDED,
)


# ---------------------------------------------------------------------------------------------
# The nightly schedule


def next_nightly_run(after: datetime) -> datetime:
    """Next nightly tick strictly after `after` (aware), as an aware America/New_York datetime.

    Matches Dagster's cron iterator for `0 2 * * *` in America/New_York (tested over a year):
    on the March change day 02:00 does not exist and the tick is at 03:00 EDT (07:00 UTC, the
    same instant 02:00 EST would have been); on the November change day the repeated hour is
    01:00-01:59, so 02:00 exists once (EST, 07:00 UTC) and there is exactly one tick.
    """
    local = after.astimezone(EASTERN)
    for offset in range(3):
        day = local.date() + timedelta(days=offset)
        # zoneinfo with fold=0 maps a wall time in the spring gap with the pre-gap offset
        # (02:00 EST == 03:00 EDT), which is what Dagster does; the UTC round trip normalises it.
        candidate = (
            datetime.combine(day, NIGHTLY_LOCAL_TIME, tzinfo=EASTERN)
            .astimezone(UTC)
            .astimezone(EASTERN)
        )
        if candidate > local:
            return candidate
    raise AssertionError("unreachable: a 2 AM tick exists within any three days")


def eastern_date(moment: datetime) -> date:
    return moment.astimezone(EASTERN).date()


def nightly_run_key(district_id: str, scheduled: datetime) -> str:
    """One nightly run per district and Eastern calendar date, however often a tick is evaluated."""
    return f"{district_id}:{eastern_date(scheduled).isoformat()}"


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def _aware_utc(stored: datetime | None) -> datetime | None:
    return stored.replace(tzinfo=UTC) if stored is not None else None


def districts_due(conn: Connection, now: datetime) -> list[st.District]:
    """Registered, active, unpaused districts (after auto-resuming expired pauses)."""
    resume_expired_pauses(conn, now)
    return [d for d in st.list_districts(conn) if not d.paused]


# ---------------------------------------------------------------------------------------------
# Pause / resume


def pause_ends_at(until: date) -> datetime:
    """`--until DATE` means "paused up to DATE": syncs resume at 00:00 Eastern on DATE, so the
    2 AM run of DATE happens."""
    return datetime.combine(until, time(0, 0), tzinfo=EASTERN)


def pause(
    conn: Connection,
    district_id: str,
    until: date | None,
    reason: str | None,
    now: datetime | None = None,
) -> None:
    st.get_district(conn, district_id)
    now = now or datetime.now(UTC)
    ends = pause_ends_at(until) if until else None
    if ends is not None and ends <= now:
        raise ValueError(
            f"--until {until} is not in the future (a pause ends at 00:00 Eastern on that date)"
        )
    conn.execute(
        st.districts.update()
        .where(st.districts.c.id == district_id)
        .values(
            paused=True,
            paused_until=_naive_utc(ends) if ends else None,
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


def resume_expired_pauses(conn: Connection, now: datetime) -> list[str]:
    """Districts whose `--until` has passed are resumed. Called by every reader (schedule,
    sensors, status) so that no separate job is needed for it."""
    rows = conn.execute(
        sa.select(st.districts.c.id).where(
            st.districts.c.paused.is_(True),
            st.districts.c.paused_until.is_not(None),
            st.districts.c.paused_until <= _naive_utc(now),
        )
    ).scalars()
    resumed = list(rows)
    for district_id in resumed:
        resume(conn, district_id)
    return resumed


# ---------------------------------------------------------------------------------------------
# Import Now


@dataclass(frozen=True)
class ImportRequest:
    id: int
    district_id: str
    requested_by: str
    requested_at: datetime
    state: str
    detail: str | None
    taken_at: datetime | None
    dagster_run_id: str | None

    @property
    def run_key(self) -> str:
        return f"import-now:{self.id}"


def request_import(
    conn: Connection, district_id: str, requested_by: str, now: datetime
) -> ImportRequest:
    """Record an Import Now press (who, when); a paused district's request is refused on the spot
    and stays visible as refused, with the reason."""
    st.get_district(conn, district_id)  # unknown district: UnknownDistrictError, nothing recorded
    resume_expired_pauses(conn, now)
    district = st.get_district(conn, district_id)
    state, detail = PENDING, None
    if district.paused:
        state, detail = REFUSED, paused_detail(district)
    result = conn.execute(
        st.import_requests.insert().values(
            district_id=district_id,
            requested_by=requested_by,
            requested_at=_naive_utc(now),
            state=state,
            detail=detail,
        )
    )
    return get_request(conn, int(result.inserted_primary_key[0]))


def paused_detail(district: st.District) -> str:
    detail = "district is paused"
    if district.paused_until:
        ends = district.paused_until.replace(tzinfo=UTC).astimezone(EASTERN)
        detail += f" until {ends:%Y-%m-%d %H:%M %Z}"
    if district.pause_reason:
        detail += f": {district.pause_reason}"
    return detail


def get_request(conn: Connection, request_id: int) -> ImportRequest:
    row = conn.execute(
        sa.select(st.import_requests).where(st.import_requests.c.id == request_id)
    ).one()
    return ImportRequest(**dict(row._mapping))


def _requests_where(conn: Connection, *conditions: Any) -> list[ImportRequest]:
    rows = conn.execute(
        sa.select(st.import_requests).where(*conditions).order_by(st.import_requests.c.id)
    )
    return [ImportRequest(**dict(row._mapping)) for row in rows]


def pending_requests(conn: Connection) -> list[ImportRequest]:
    return _requests_where(conn, st.import_requests.c.state == PENDING)


def unlinked_requests(conn: Connection) -> list[ImportRequest]:
    """Taken requests whose Dagster run id is not known yet (the run is queued or never ran)."""
    return _requests_where(
        conn,
        st.import_requests.c.state == TAKEN,
        st.import_requests.c.dagster_run_id.is_(None),
    )


def recent_requests(conn: Connection, district_id: str, limit: int = 5) -> list[ImportRequest]:
    rows = conn.execute(
        sa.select(st.import_requests)
        .where(st.import_requests.c.district_id == district_id)
        .order_by(st.import_requests.c.id.desc())
        .limit(limit)
    )
    return [ImportRequest(**dict(row._mapping)) for row in rows]


def mark_request(
    conn: Connection,
    request_id: int,
    state: str,
    detail: str | None = None,
    dagster_run_id: str | None = None,
) -> None:
    values: dict[str, Any] = {"state": state}
    if detail is not None:
        values["detail"] = detail
    if dagster_run_id is not None:
        values["dagster_run_id"] = dagster_run_id
    if state == TAKEN:
        values["taken_at"] = _naive_utc(datetime.now(UTC))
    conn.execute(
        st.import_requests.update().where(st.import_requests.c.id == request_id).values(**values)
    )


def attach_run_to_import_request(conn: Connection, request_id: int | str, run_id: str) -> bool:
    """Link the Dagster run that serves an Import Now request to it, so the request's status
    follows the run (queued → running → applied / failed / held ...).

    Called by the `oneroster_delivery` asset when the run carries tag `capti/import_request`,
    and by the sensors as a fallback (runs that die before the asset starts). Idempotent;
    returns False for an unknown or refused request id (e.g. a hand-edited tag).
    """
    try:
        request_id = int(request_id)
    except (TypeError, ValueError):
        return False
    result = conn.execute(
        st.import_requests.update()
        .where(st.import_requests.c.id == request_id, st.import_requests.c.state != REFUSED)
        .values(
            dagster_run_id=run_id,
            state=TAKEN,
            taken_at=sa.func.coalesce(st.import_requests.c.taken_at, _naive_utc(datetime.now(UTC))),
        )
    )
    return result.rowcount == 1


def request_status(conn: Connection, request: ImportRequest) -> str:
    """queued → running → applied / no_changes / failed / held / refused, as the admin page
    shows it. A request whose run is in Dagster's queue (no roster-store record yet) is queued."""
    if request.state == REFUSED:
        return REFUSED
    if request.state == PENDING or request.dagster_run_id is None:
        return QUEUED
    run = st.get_run(conn, request.dagster_run_id)
    return run.state if run else QUEUED


def request_view(conn: Connection, request: ImportRequest) -> dict[str, Any]:
    return {
        "id": request.id,
        "requested_by": request.requested_by,
        "requested_at": _iso_eastern(request.requested_at),
        "status": request_status(conn, request),
        "detail": request.detail,
        "run_id": request.dagster_run_id,
    }


# ---------------------------------------------------------------------------------------------
# Status


def next_run_for(district: st.District, now: datetime) -> datetime | None:
    """The next nightly tick that will sync this district (None while paused indefinitely)."""
    if not district.paused:
        return next_nightly_run(now)
    if district.paused_until is None:
        return None
    resume_at = district.paused_until.replace(tzinfo=UTC)
    # A tick exactly at the resume instant counts (the pause is over by then).
    return next_nightly_run(max(now, resume_at - timedelta(microseconds=1)))


def _iso_eastern(stored: datetime | None) -> str | None:
    aware = _aware_utc(stored)
    return aware.astimezone(EASTERN).isoformat() if aware else None


def pending_held_run(conn: Connection, district_id: str) -> st.RunRecord | None:
    """The held plan waiting for `capti-sync approve` / `discard`, if any.

    A held plan stays pending whatever runs come after it that change nothing (dry runs,
    deliveries not ready, refused or failed runs, no_changes): it is the latest run in state
    held. It stops being pending when it is approved or discarded, or superseded: by a newer
    hold, or by a later run that applied changes to the district (sync.supersede_held_plans;
    its base roster version is stale then, and approve would refuse it anyway).
    """
    return st.latest_run(conn, district_id, states=[rp.HELD])


def district_status(conn: Connection, district: st.District, now: datetime) -> dict[str, Any]:
    """One district as `capti-sync status` shows it; every time is in America/New_York."""
    last = st.latest_run(conn, district.id)
    held = pending_held_run(conn, district.id)
    if held is not None and held.base_version not in (None, district.roster_version):
        held = None  # computed against an older roster: approve would refuse it
    last_finished = st.latest_run(conn, district.id, states=list(_FINISHED_STATES))
    nxt = next_run_for(district, now)
    requests = recent_requests(conn, district.id, limit=1)
    return {
        "district": district.id,
        "name": district.name,
        "state": district.state,
        "detail": district.state_detail,
        "paused": district.paused,
        "paused_until": _iso_eastern(district.paused_until),
        "pause_reason": district.pause_reason,
        "adds_only": district.adds_only,
        "held": held is not None,
        "held_run_id": held.run_id if held else None,
        "held_reason": held.reason if held else None,
        "running": bool(last and last.state == RUNNING),
        "last_run_id": last.run_id if last else None,
        "last_run_state": last.state if last else None,
        "last_run_started_at": _iso_eastern(last.started_at) if last else None,
        "last_finished_at": _iso_eastern(last_finished.finished_at) if last_finished else None,
        "last_result": last_finished.state if last_finished else None,
        "counts": last_finished.counts if last_finished else {},
        "next_scheduled_run": nxt.isoformat() if nxt else None,
        "last_import_request": request_view(conn, requests[0]) if requests else None,
    }
