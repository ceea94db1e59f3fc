"""The sync's stages composed from the pure modules; the Dagster assets and the CLI call these.

read → validate → resolve → diff → (safety) → apply → report. Nothing here knows about Dagster.
"""

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from capti_pipeline.lib import operations
from capti_pipeline.lib import report as rp
from capti_pipeline.lib import store as st
from capti_pipeline.lib.apply import AppliedChanges, apply_plan, undo_plan
from capti_pipeline.lib.diff import Plan, compute_plan, filter_adds_only
from capti_pipeline.lib.resolve import ROLE_LABELS, ResolvedRoster, resolve_roster
from capti_pipeline.lib.safety import Hold, check_completeness, check_thresholds, shrink_percent
from capti_pipeline.lib.state import StoreState, load_state, load_state_and_backfill
from capti_pipeline.lib.validate import KnownRecords, ValidatedDelivery, validate_delivery


def validate_landed_delivery(
    engine: Engine, district_id: str, directory: Path
) -> ValidatedDelivery:
    with engine.connect() as conn:
        org_types = st.known_org_types(conn, district_id)
    stored = _LazyState(engine, district_id)
    known = KnownRecords(
        org_types=org_types, users=stored.active_ids("users"), classes=stored.active_ids("classes")
    )
    return validate_delivery(directory, known)


class _LazyState:
    """The stored state, read only if validation asks for it: references in delta (or absent)
    files may point at stored records; a bulk delivery never needs them."""

    def __init__(self, engine: Engine, district_id: str):
        self._engine, self._district_id = engine, district_id
        self._state: StoreState | None = None

    def active_ids(self, entity: str) -> "_LazyIds":
        return _LazyIds(self, entity)

    def get(self) -> StoreState:
        if self._state is None:
            with self._engine.connect() as conn:
                self._state = load_state(conn, self._district_id)
        return self._state


class _LazyIds:
    def __init__(self, state: _LazyState, entity: str):
        self._state, self._entity = state, entity

    def __iter__(self) -> Iterator[str]:
        return iter(self._state.get().active_ids(self._entity).tolist())


def resolve_delivery(
    engine: Engine, district_id: str, delivery: ValidatedDelivery
) -> ResolvedRoster:
    with engine.connect() as conn:
        org_types = st.known_org_types(conn, district_id)
    return resolve_roster(delivery, org_types)


@dataclass
class PlannedSync:
    plan: Plan
    holds: list[Hold]
    skipped_by_adds_only: dict[str, int] = field(default_factory=dict)


def plan_sync(engine: Engine, district_id: str, roster: ResolvedRoster) -> PlannedSync:
    state = load_state_and_backfill(engine, district_id)
    with engine.connect() as conn:
        district = st.get_district(conn, district_id)
        allowed = set(
            conn.execute(
                sa.select(st.duplicate_decisions.c.sourced_id).where(
                    st.duplicate_decisions.c.district_id == district_id
                )
            ).scalars()
        )
        last_rows = completeness_baseline(conn, district_id)
    plan = compute_plan(district_id, roster, state, allowed_duplicates=allowed)
    skipped: dict[str, int] = {}
    if district.adds_only:
        plan, skipped = filter_adds_only(plan)
    active = {entity: state.active_count(entity) for entity in state.frames}
    holds = check_thresholds(plan, active, district.thresholds)
    shrink = shrink_percent(district.thresholds)
    holds += check_completeness(roster.rows_read, roster.file_modes, last_rows, shrink)
    return PlannedSync(plan, holds, skipped)


def completeness_baseline(conn: sa.Connection, district_id: str) -> dict[str, int] | None:
    """rows_read of the delivery the roster currently reflects, for the completeness rule.

    The latest sync run that applied its delivery or found nothing to change, or approve run
    (it carries the rows_read of the plan it applied, at the time it applied it), that was not
    undone. Undo runs have no delivery; runs between an undone run and its undo (a no_changes
    run against the undone roster, say) do not count either: the roster went back to before them.
    """
    runs = sa.select(
        st.sync_runs.c.run_id,
        st.sync_runs.c.kind,
        st.sync_runs.c.state,
        st.sync_runs.c.started_at,
    ).where(st.sync_runs.c.district_id == district_id)
    rows = conn.execute(
        runs.order_by(st.sync_runs.c.started_at.desc(), st.sync_runs.c.run_id.desc())
    ).all()
    started = {row.run_id: row.started_at for row in rows}
    undone_spans = []
    for row in rows:
        if row.kind == "undo" and row.state == rp.APPLIED:
            undo = st.get_run(conn, row.run_id)
            reverted_ids = (undo.report if undo else {}).get("reverted_runs") or []
            reverted = [started[r] for r in reverted_ids if r in started]
            if reverted:
                undone_spans.append((min(reverted), row.started_at))
    for row in rows:
        if not (
            (row.kind == "sync" and row.state in (rp.APPLIED, rp.NO_CHANGES))
            or (row.kind == "approve" and row.state == rp.APPLIED)
        ):
            continue
        if any(start <= row.started_at < end for start, end in undone_spans):
            continue
        run = st.get_run(conn, row.run_id)
        rows_read = (run.report if run else {}).get("rows_read")
        if rows_read:
            return dict(rows_read)
    return None


def apply_in_transaction(engine: Engine, plan: Plan, run_id: str) -> AppliedChanges:
    """Apply the plan in one transaction (held plans of the district are superseded in it)."""
    with engine.begin() as conn:
        return _apply(conn, plan, run_id)


def _apply(
    conn: sa.Connection, plan: Plan, run_id: str, *, approving: str | None = None
) -> AppliedChanges:
    """apply_plan, and the district's held plans (but the one being approved) superseded in the
    same transaction: they were computed against the roster this apply changes."""
    applied = apply_plan(conn, plan, run_id)
    supersede_held_plans(
        conn,
        plan.district_id,
        f"superseded: run {run_id} changed the roster after this plan was computed",
        keep=approving,
    )
    return applied


def store_plan(engine: Engine, run_id: str, plan: Plan) -> None:
    with engine.begin() as conn:
        st.save_payload(conn, run_id, "plan", plan.changes)


def load_plan(engine: Engine, run: st.RunRecord) -> Plan:
    with engine.connect() as conn:
        changes = st.load_payload(conn, run.run_id, "plan")
    membership = run.report.get("membership_changes") or {"added": 0, "ended": 0}
    return Plan(
        run.district_id, int(run.base_version or 0), changes, [], membership_changes=membership
    )


class NothingHeldError(Exception):
    pass


def supersede_held_plans(
    conn: sa.Connection, district_id: str, reason: str, *, keep: str | None = None
) -> list[str]:
    """Mark the district's held plans (but `keep`) superseded and drop their stored plans.

    The district's own state is left alone: it describes the run that caused this."""
    query = sa.select(st.sync_runs.c.run_id).where(
        st.sync_runs.c.district_id == district_id, st.sync_runs.c.state == rp.HELD
    )
    if keep is not None:
        query = query.where(st.sync_runs.c.run_id != keep)
    superseded = list(conn.execute(query).scalars())
    for held_id in superseded:
        conn.execute(
            st.sync_runs.update()
            .where(st.sync_runs.c.run_id == held_id)
            .values(state=rp.SUPERSEDED, reason=reason)
        )
        st.drop_payload(conn, held_id, "plan")
    return superseded


def supersede_older_holds(engine: Engine, district_id: str, newer_run_id: str) -> list[str]:
    """A new hold replaces the district's older held plans (called once it is recorded)."""
    with engine.begin() as conn:
        return supersede_held_plans(
            conn,
            district_id,
            f"superseded by the newer held plan of run {newer_run_id}",
            keep=newer_run_id,
        )


def held_run(engine: Engine, district_id: str) -> st.RunRecord:
    """The district's pending held plan (see operations.pending_held_run for the rule)."""
    with engine.connect() as conn:
        st.get_district(conn, district_id)
        run = operations.pending_held_run(conn, district_id)
        if run is not None:
            return run
        last = st.latest_run(conn, district_id, states=[rp.SUPERSEDED])
    detail = f" (the last one, run {last.run_id}, was {last.reason})" if last else ""
    raise NothingHeldError(f"district {district_id} has no held plan{detail}")


def _start_operator_run(
    conn: sa.Connection, run_id: str, district_id: str, *, kind: str, trigger: str, source: str
) -> None:
    """Record an approve/undo run, which runs in the operator's CLI process and not in Dagster:
    its pid and host are kept in the running report, so `capti-sync status` can tell a killed
    process from a live one (run_status.fail_dead_operator_runs)."""
    st.record_run_start(conn, run_id, district_id, kind=kind, trigger=trigger, source_run_id=source)
    running = rp.build_report(
        district_id=district_id,
        run_id=run_id,
        state="running",
        issues=[],
        reason=f"{kind} in progress",
        extra={"runner": {"pid": os.getpid(), "host": socket.gethostname()}},
    )
    conn.execute(
        st.sync_runs.update()
        .where(st.sync_runs.c.run_id == run_id)
        .values(report=json.dumps(running, sort_keys=True))
    )


def _fail_operator_run(engine: Engine, district_id: str, run_id: str, reason: str) -> None:
    report = rp.build_report(
        district_id=district_id, run_id=run_id, state=rp.FAILED, issues=[], reason=reason
    )
    with engine.begin() as conn:
        st.record_run_end(conn, run_id, state=rp.FAILED, reason=reason, report=report)


def approve_held_plan(engine: Engine, district_id: str, run_id: str, actor: str) -> dict[str, Any]:
    """Apply exactly the stored plan of the pending held run (no re-read of newer files).

    A plan computed against an older roster version is refused (StalePlanError) and marked
    superseded: it no longer describes what would change."""
    held = held_run(engine, district_id)
    plan = load_plan(engine, held)
    if not plan.changes and plan_total(held) > 0:
        raise NothingHeldError(
            f"district {district_id}: the stored plan of held run {held.run_id} is missing"
        )
    with engine.begin() as conn:
        _start_operator_run(
            conn,
            run_id,
            district_id,
            kind="approve",
            trigger=f"approve:{actor}",
            source=held.run_id,
        )
    reason = f"approved held plan of run {held.run_id} by {actor}"
    try:
        # The apply and the records of its outcome commit together: a killed process leaves
        # either nothing applied (the record says running until status sees the process gone)
        # or everything applied and recorded.
        with engine.begin() as conn:
            applied = _apply(conn, plan, run_id, approving=held.run_id)
            report = rp.build_report(
                district_id=district_id,
                run_id=run_id,
                state=rp.APPLIED,
                issues=[],
                counts=applied.counts,
                reason=reason,
                rows_read=held.report.get("rows_read"),
                extra={"rows_written": applied.rows_written},
            )
            st.record_run_end(
                conn,
                held.run_id,
                state=rp.APPROVED,
                reason=f"approved by {actor} as run {run_id}",
            )
            st.record_run_end(
                conn,
                run_id,
                state=rp.APPLIED,
                reason=reason,
                counts=applied.counts,
                report=report,
                base_version=plan.base_version,
            )
            st.drop_payload(conn, held.run_id, "plan")
    except st.StalePlanError as exc:
        _fail_operator_run(engine, district_id, run_id, str(exc))
        with engine.begin() as conn:
            supersede_held_plans(
                conn,
                district_id,
                f"superseded: approve run {run_id} found the roster changed since this plan "
                "was computed",
            )
        raise
    except Exception as exc:
        _fail_operator_run(engine, district_id, run_id, f"approve failed: {exc}"[:2000])
        raise
    return report


def plan_total(run: st.RunRecord) -> int:
    """Changes a stored plan holds, from its run's counts (memberships follow users)."""
    return sum(
        int(n)
        for entity, per in (run.counts or {}).items()
        if entity != "memberships" and isinstance(per, dict)
        for n in per.values()
    )


def discard_held_plan(engine: Engine, district_id: str, actor: str) -> st.RunRecord:
    held = held_run(engine, district_id)
    with engine.begin() as conn:
        st.record_run_end(conn, held.run_id, state=rp.DISCARDED, reason=f"discarded by {actor}")
        st.drop_payload(conn, held.run_id, "plan")
    return held


class UndoError(Exception):
    pass


def undo_runs(
    engine: Engine, district_id: str, target_run_id: str, run_id: str, actor: str
) -> dict[str, Any]:
    """Return the roster to its state before `target_run_id` (reverting later runs too)."""
    with engine.connect() as conn:
        target = st.get_run(conn, target_run_id)
        if target is None or target.district_id != district_id:
            raise UndoError(f"run {target_run_id} is not a run of district {district_id}")
        applied = [
            r
            for r in st.list_runs(conn, district_id, limit=10_000)
            if r.state == rp.APPLIED and r.finished_at is not None
        ]
    applied.sort(key=lambda r: (r.finished_at, r.run_id), reverse=True)
    ids = [r.run_id for r in applied]
    if target_run_id not in ids:
        raise UndoError(
            f"run {target_run_id} did not apply changes (state {target.state}); nothing to undo"
        )
    to_revert = ids[: ids.index(target_run_id) + 1]
    with engine.begin() as conn:
        plan = undo_plan(conn, district_id, to_revert)
        _start_operator_run(
            conn, run_id, district_id, kind="undo", trigger=f"undo:{actor}", source=target_run_id
        )
    reverted = ", ".join(to_revert)
    try:
        with engine.begin() as conn:  # apply and records commit together (see approve)
            changes = _apply(conn, plan, run_id)
            report = rp.build_report(
                district_id=district_id,
                run_id=run_id,
                state=rp.APPLIED,
                issues=[],
                counts=changes.counts,
                reason=f"undo by {actor}: reverted run(s) {reverted}",
                extra={"reverted_runs": to_revert, "rows_written": changes.rows_written},
            )
            st.record_run_end(
                conn,
                run_id,
                state=rp.APPLIED,
                reason=report["reason"],
                counts=changes.counts,
                report=report,
            )
            for reverted_id in to_revert:
                conn.execute(
                    st.sync_runs.update()
                    .where(st.sync_runs.c.run_id == reverted_id)
                    .values(state="undone", reason=f"undone by run {run_id}")
                )
    except Exception as exc:
        _fail_operator_run(engine, district_id, run_id, f"undo failed: {exc}"[:2000])
        raise
    return report


def snapshot(engine: Engine, district_id: str) -> dict[str, Any]:
    """The district's roster as the JSON shape `capti-sync snapshot` prints."""
    with engine.connect() as conn:
        district = st.get_district(conn, district_id)
        frames = {e: st.read_full_rows(conn, district_id, e) for e in st.ROSTER_TABLES}
    labels = ROLE_LABELS[district.higher_ed]
    locs = frames["locations"].sort_values("sourced_id")
    users = frames["users"].sort_values("sourced_id")
    classes = frames["classes"].sort_values("sourced_id")
    enrollments = frames["enrollments"].sort_values("sourced_id")
    return {
        "district": district_id,
        "locations": [
            {"sourcedId": r.sourced_id, "name": r.name, "type": r.type, "status": r.status}
            for r in locs.itertuples(index=False)
        ],
        "users": [
            {
                "sourcedId": r.sourced_id,
                "accountId": int(r.id),
                "status": r.status,
                "role": r.role,
                "roleLabel": labels.get(r.role, r.role),
                "enabled": bool(r.enabled),
                "username": r.username,
                "givenName": r.given_name,
                "familyName": r.family_name,
                "email": r.email,
                "identifier": r.identifier,
                "grades": [g for g in r.grades.split(",") if g],
                # An archived user was removed from its schools (memberships ended): none shown.
                # The store keeps its last locations, which a restore gives back.
                "locations": (
                    [loc for loc in r.locations.split(",") if loc] if r.status == "active" else []
                ),
            }
            for r in users.itertuples(index=False)
        ],
        "classes": [
            {
                "sourcedId": r.sourced_id,
                "title": r.title,
                "location": r.location,
                "status": r.status,
            }
            for r in classes.itertuples(index=False)
        ],
        "enrollments": [
            {
                "sourcedId": r.sourced_id,
                "class": r.class_sourced_id,
                "user": r.user_sourced_id,
                "role": r.role,
                "status": r.status,
            }
            for r in enrollments.itertuples(index=False)
        ],
    }
