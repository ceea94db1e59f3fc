"""Apply a plan to the store in one transaction per district, keeping a ledger for undo.

The caller opens the transaction (`engine.begin()`); everything here runs inside it, so a crash
or `kill -9` anywhere leaves the store exactly as it was before the run.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from capti_pipeline.lib import state
from capti_pipeline.lib import store as st
from capti_pipeline.lib.diff import Plan, location_pairs
from capti_pipeline.lib.failpoints import failpoint
from capti_pipeline.lib.fastops import isin, sort_order
from capti_pipeline.lib.resolve import ENTITIES, VALUE_COLUMNS

# Restores and updates write every value column, so they share one statement.
_FULL_WRITE = ("update", "restore", "revert")


@dataclass(frozen=True)
class AppliedChanges:
    run_id: str
    roster_version: int
    rows_written: int
    counts: dict[str, dict[str, int]]


def apply_plan(conn: Connection, plan: Plan, run_id: str) -> AppliedChanges:
    """Write the plan; raises StalePlanError (nothing written) if the roster moved meanwhile."""
    version = st.claim_roster_version(conn, plan.district_id, plan.base_version)
    snapshot_base = state.base_for_apply(conn, plan.district_id, plan.base_version)
    ledger = _ledger(conn, plan)
    written = 0
    for entity in ENTITIES:
        changes = plan.changes.get(entity)
        if changes is None or changes.empty:
            continue
        written += _write_entity(conn, plan.district_id, entity, changes, run_id)
        failpoint(f"apply:after-{entity}")
    written += _rewrite_memberships(conn, plan.district_id, plan.changes.get("users"), ledger)
    st.save_payload(conn, run_id, "ledger", ledger)
    state.record_apply(conn, plan.district_id, version, plan.changes, snapshot_base)
    return AppliedChanges(run_id, version, written, plan.counts())


def _ledger(conn: Connection, plan: Plan) -> dict[str, pd.DataFrame]:
    """Before-images of every row the plan changes (store columns). Created rows need none:
    they carry the run in `created_run`, which is how undo finds them."""
    ledger: dict[str, pd.DataFrame] = {}
    for entity in ENTITIES:
        changes = plan.changes.get(entity)
        if changes is None or changes.empty:
            continue
        # Only existing rows are read and mapped (a first import of millions reads nothing).
        existing = changes[~changes["action"].eq("create")]
        if existing.empty:
            continue
        if entity in plan.before:  # whole before-images from the state the plan was made on
            known = plan.before[entity]
            before = known[isin(known["sourced_id"], existing["sourcedId"].astype("str"))]
            before = before.reset_index(drop=True)
        else:
            ids = existing["sourcedId"].tolist()
            before = st.read_full_rows(conn, plan.district_id, entity, ids)
            before = before.drop(columns=["id"], errors="ignore")
        # Nullable Int64 keeps 63-bit hashes exact in the Parquet ledger (never floats).
        before["row_hash"] = before["row_hash"].astype("Int64")
        action_of = dict(zip(existing["sourcedId"], existing["action"], strict=True))
        before.insert(0, "action", before["sourced_id"].map(action_of))
        ledger[entity] = before
    return ledger


def _write_entity(
    conn: Connection, district_id: str, entity: str, changes: pd.DataFrame, run_id: str
) -> int:
    table = st.ROSTER_TABLES[entity].name
    names = st.COLUMN_NAMES[entity]
    value_columns = list(VALUE_COLUMNS[entity])
    store_columns = [names[c] for c in value_columns]
    written = 0

    creates = changes[changes["action"].eq("create")]
    if not creates.empty:
        frame = creates[["sourcedId", *value_columns, "row_hash"]]
        frame = frame.set_axis(["sourced_id", *store_columns, "row_hash"], axis=1)
        # In key order, the (district_id, sourced_id) index grows at its end instead of
        # splitting pages all over (a third less time for millions of rows).
        order = sort_order(frame["sourced_id"])
        constants = {
            "district_id": district_id,
            "status": "active",
            "created_run": run_id,
            "updated_run": run_id,
        }
        written += st.insert_frame(conn, table, frame, constants, order)

    full = changes[changes["action"].isin(_FULL_WRITE)]
    if not full.empty:
        status = full["status"] if "status" in full.columns else None
        frame = full.assign(
            status=status.fillna("active") if status is not None else "active",
            updated_run=run_id,
            district_id=district_id,
        )
        sets = ", ".join(f"{c} = ?" for c in [*store_columns, "status", "row_hash", "updated_run"])
        rows = st._rows(
            frame, [*value_columns, "status", "row_hash", "updated_run", "district_id", "sourcedId"]
        )
        written += st.execute_many(
            conn, f"UPDATE {table} SET {sets} WHERE district_id = ? AND sourced_id = ?", rows
        )

    archives = changes[changes["action"].eq("archive")]
    if not archives.empty:
        rows = [(run_id, district_id, s) for s in archives["sourcedId"].tolist()]
        written += st.execute_many(
            conn,
            f"UPDATE {table} SET status = 'archived', updated_run = ? "
            "WHERE district_id = ? AND sourced_id = ?",
            rows,
        )

    deletes = changes[changes["action"].eq("delete")]
    if not deletes.empty:
        rows = [(district_id, s) for s in deletes["sourcedId"].tolist()]
        written += st.execute_many(
            conn, f"DELETE FROM {table} WHERE district_id = ? AND sourced_id = ?", rows
        )
    return written


_MEMBERSHIP_COLUMNS = ["district_id", "user_sourced_id", "location_sourced_id", "status"]


def _rewrite_memberships(
    conn: Connection,
    district_id: str,
    user_changes: pd.DataFrame | None,
    ledger: dict[str, pd.DataFrame],
) -> int:
    """Memberships follow the user rows: for every user the plan touched, the membership rows
    become (user, school, status) of its new locations (archived: its last locations, archived;
    deleted: none). Only rows that differ are written; returns how many were."""
    if user_changes is None or user_changes.empty:
        return 0
    wanted = _wanted_memberships(district_id, user_changes, ledger.get("users"))
    affected = user_changes["sourcedId"].astype("str")
    if len(affected) > 200_000:  # a first import: one scan beats that many lookups
        existing = st.read_table_columns(conn, st.memberships, district_id, _MEMBERSHIP_COLUMNS[1:])
        existing = existing[isin(existing["user_sourced_id"], affected)]
    else:
        existing = st.read_table_columns(
            conn,
            st.memberships,
            district_id,
            _MEMBERSHIP_COLUMNS[1:],
            where=("user_sourced_id", affected.tolist()),
        )
    if existing.empty:  # e.g. a first import: every wanted row is new
        gone = restated = existing.assign(status_now=existing["status"])
        new = wanted
    else:
        key = ["user_sourced_id", "location_sourced_id"]
        both = wanted.merge(existing, on=key, how="outer", suffixes=("", "_now"), indicator=True)
        gone = both[both["_merge"].eq("right_only")]
        new = both[both["_merge"].eq("left_only")]
        restated = both[both["_merge"].eq("both") & both["status"].ne(both["status_now"])]
    written = st.execute_many(
        conn,
        "DELETE FROM memberships WHERE district_id = ? AND user_sourced_id = ? "
        "AND location_sourced_id = ?",
        zip(
            [district_id] * len(gone),
            gone["user_sourced_id"].tolist(),
            gone["location_sourced_id"].tolist(),
            strict=True,
        ),
    )
    written += st.execute_many(
        conn,
        "UPDATE memberships SET status = ? WHERE district_id = ? AND user_sourced_id = ? "
        "AND location_sourced_id = ?",
        zip(
            restated["status"].tolist(),
            [district_id] * len(restated),
            restated["user_sourced_id"].tolist(),
            restated["location_sourced_id"].tolist(),
            strict=True,
        ),
    )
    rows = new[_MEMBERSHIP_COLUMNS[1:]]
    # In primary-key order, like the roster rows (the index grows at its end).
    order = sort_order(rows["user_sourced_id"], rows["location_sourced_id"])
    return written + st.insert_frame(conn, "memberships", rows, {"district_id": district_id}, order)


def _wanted_memberships(
    district_id: str, user_changes: pd.DataFrame, before: pd.DataFrame | None
) -> pd.DataFrame:
    """(user, school, status) rows the touched users should have after the plan."""
    kept = user_changes[~user_changes["action"].eq("delete")].reset_index(drop=True)
    locations = kept["locations"].astype("object").fillna("").astype("str")
    status = np.full(len(kept), "active", dtype=object)
    if "status" in kept.columns:  # undo's reverts restore the before-image status
        given = kept["status"].notna().to_numpy()
        status[given] = kept["status"][given].astype("str").to_numpy(dtype=object)
    archive = kept["action"].eq("archive").to_numpy()
    if archive.any():
        last = (
            dict(zip(before["sourced_id"], before["locations"].fillna(""), strict=True))
            if before is not None and "locations" in before.columns
            else {}
        )
        locations[archive] = kept["sourcedId"][archive].map(lambda s: last.get(s, ""))
        status[archive] = "archived"
    pairs = location_pairs(kept["sourcedId"], locations)
    return pd.DataFrame(
        {
            "user_sourced_id": pairs["user"].astype("str"),
            "location_sourced_id": pairs["location"].astype("str"),
            "status": pd.Series(status[pairs["row"].to_numpy()], dtype="str"),
        }
    )


def undo_plan(conn: Connection, district_id: str, run_ids: list[str]) -> Plan:
    """The plan that reverts the given applied runs (newest first): rows they changed go back to
    their before-images, rows they created are deleted."""
    reverted: dict[str, pd.DataFrame] = {}
    version = st.get_district(conn, district_id).roster_version
    for run_id in run_ids:
        ledger = st.load_payload(conn, run_id, "ledger")
        for entity in ENTITIES:
            frame = ledger.get(entity, pd.DataFrame(columns=["action", "sourced_id"]))
            created = st.read_table_columns(
                conn,
                st.ROSTER_TABLES[entity],
                district_id,
                ["sourced_id"],
                where=("created_run", [run_id]),
            )
            # (Ledgers written before creates were found by `created_run` list them too.)
            frame = pd.concat(
                [frame, pd.DataFrame({"action": "create", "sourced_id": created["sourced_id"]})],
                ignore_index=True,
            ).drop_duplicates("sourced_id", keep="first")
            if frame.empty:
                continue
            reverse = _reverse(entity, frame)
            if entity in reverted:
                # The older run's before-image wins for rows both runs touched; a row created
                # by one of the runs and touched again later ends up deleted.
                newer = reverted[entity]
                newer = newer[~newer["sourcedId"].isin(reverse["sourcedId"])]
                reverse = pd.concat([newer, reverse], ignore_index=True)
            reverted[entity] = reverse
    return Plan(district_id, version, {e: reverted[e] for e in ENTITIES if e in reverted})


def _reverse(entity: str, ledger: pd.DataFrame) -> pd.DataFrame:
    names = st.COLUMN_NAMES[entity]
    created = ledger["action"].eq("create")
    deleted_ids = ledger["sourced_id"][created]
    deletes = pd.DataFrame(
        {
            "action": "delete",
            "sourcedId": deleted_ids.to_numpy(),
            "row_hash": pd.array([pd.NA] * len(deleted_ids), dtype="Int64"),
        }
    )
    before = ledger[~created]
    reverts = pd.DataFrame(
        {
            "action": "revert",
            "sourcedId": before["sourced_id"],
            **{roster: before[store] for roster, store in names.items()},
            "status": before["status"],
            "row_hash": before["row_hash"].astype("Int64"),
        }
    )
    if "enabled" in reverts.columns:
        reverts["enabled"] = reverts["enabled"].astype(bool)
    return pd.concat([f for f in (deletes, reverts) if not f.empty] or [deletes], ignore_index=True)


def district_row_counts(conn: Connection, district_id: str) -> dict[str, int]:
    counts = {}
    for entity, table in st.ROSTER_TABLES.items():
        counts[entity] = conn.execute(
            sa.select(sa.func.count()).select_from(table).where(table.c.district_id == district_id)
        ).scalar_one()
    return counts
