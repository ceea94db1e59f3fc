"""The sync's stages composed from the pure modules; the Dagster assets and the CLI call these.

read → validate → resolve → diff → (safety) → apply → report. Nothing here knows about Dagster.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

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
        last_applied = st.latest_run(
            conn, district_id, states=[rp.APPLIED, rp.NO_CHANGES, rp.APPROVED]
        )
    plan = compute_plan(district_id, roster, state, allowed_duplicates=allowed)
    skipped: dict[str, int] = {}
    if district.adds_only:
        plan, skipped = filter_adds_only(plan)
    active = {entity: state.active_count(entity) for entity in state.frames}
    holds = check_thresholds(plan, active, district.thresholds)
    last_rows = (last_applied.report.get("rows_read") if last_applied else None) or None
    shrink = shrink_percent(district.thresholds)
    holds += check_completeness(roster.rows_read, roster.file_modes, last_rows, shrink)
    return PlannedSync(plan, holds, skipped)


def apply_in_transaction(engine: Engine, plan: Plan, run_id: str) -> AppliedChanges:
    with engine.begin() as conn:
        return apply_plan(conn, plan, run_id)


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


def held_run(engine: Engine, district_id: str) -> st.RunRecord:
    with engine.connect() as conn:
        run = st.latest_run(conn, district_id)
    if run is None or run.state != rp.HELD:
        raise NothingHeldError(f"district {district_id} has no held plan")
    return run


def approve_held_plan(engine: Engine, district_id: str, run_id: str, actor: str) -> dict[str, Any]:
    """Apply exactly the stored plan of the held run (no re-read of newer files)."""
    held = held_run(engine, district_id)
    plan = load_plan(engine, held)
    with engine.begin() as conn:
        st.record_run_start(
            conn,
            run_id,
            district_id,
            kind="approve",
            trigger=f"approve:{actor}",
            source_run_id=held.run_id,
        )
    try:
        applied = apply_in_transaction(engine, plan, run_id)
    except st.StalePlanError as exc:
        report = rp.build_report(
            district_id=district_id, run_id=run_id, state=rp.FAILED, issues=[], reason=str(exc)
        )
        with engine.begin() as conn:
            st.record_run_end(conn, run_id, state=rp.FAILED, reason=str(exc), report=report)
        raise
    report = rp.build_report(
        district_id=district_id,
        run_id=run_id,
        state=rp.APPLIED,
        issues=[],
        counts=applied.counts,
        reason=f"approved held plan of run {held.run_id} by {actor}",
        rows_read=held.report.get("rows_read"),
        extra={"rows_written": applied.rows_written},
    )
    with engine.begin() as conn:
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
            reason=report["reason"],
            counts=applied.counts,
            report=report,
            base_version=plan.base_version,
        )
        st.drop_payload(conn, held.run_id, "plan")
    return report


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
        st.record_run_start(
            conn,
            run_id,
            district_id,
            kind="undo",
            trigger=f"undo:{actor}",
            source_run_id=target_run_id,
        )
    changes = apply_in_transaction(engine, plan, run_id)
    reverted = ", ".join(to_revert)
    report = rp.build_report(
        district_id=district_id,
        run_id=run_id,
        state=rp.APPLIED,
        issues=[],
        counts=changes.counts,
        reason=f"undo by {actor}: reverted run(s) {reverted}",
        extra={"reverted_runs": to_revert, "rows_written": changes.rows_written},
    )
    with engine.begin() as conn:
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
