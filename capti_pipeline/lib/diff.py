"""Compare the resolved roster with the live store and produce the plan of changes.

Unchanged rows cost one integer comparison (row hashes); everything is vectorised. Deletions are
scoped: only records inside the schools this delivery covers, never a row that validation
rejected, and never anything in a file that is absent. New accounts that look like an existing
one (same username, email or identifier) are held back as possible duplicates.
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from capti_pipeline.lib.fastops import isin
from capti_pipeline.lib.issues import WARNING, Issue
from capti_pipeline.lib.resolve import ENTITIES, VALUE_COLUMNS, ResolvedRoster
from capti_pipeline.lib.state import StoreState

ACTIONS = ("create", "update", "archive", "restore")
UNDO_ACTIONS = ("revert", "delete")
_SAMPLE = 5


@dataclass
class Plan:
    """The changes one sync would make to one district, entity by entity.

    Each `changes` frame has an `action` column plus the roster columns of the new values
    (empty for archive/delete). `base_version` is the store version the plan was computed against.
    """

    district_id: str
    base_version: int
    changes: dict[str, pd.DataFrame]
    issues: list[Issue] = field(default_factory=list)
    duplicates: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["sourcedId", "matches", "field"])
    )
    membership_changes: dict[str, int] = field(default_factory=lambda: {"added": 0, "ended": 0})
    rows_read: dict[str, int] = field(default_factory=dict)
    # Changes left out because the district is in adds-only mode, per entity.
    skipped_by_adds_only: dict[str, int] = field(default_factory=dict)
    # Before-images (store columns) of changed rows the state holds whole, as of base_version:
    # the apply's ledger for them needs no read of the store.
    before: dict[str, pd.DataFrame] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for entity in ENTITIES:
            frame = self.changes.get(entity)
            actions = frame["action"].value_counts() if frame is not None else pd.Series()
            out[entity] = {a: int(actions.get(a, 0)) for a in (*ACTIONS, *UNDO_ACTIONS)}
            out[entity] = {a: n for a, n in out[entity].items() if n or a in ACTIONS}
        out["memberships"] = dict(self.membership_changes)
        return out

    def total(self) -> int:
        return sum(len(frame) for frame in self.changes.values())

    def is_empty(self) -> bool:
        return self.total() == 0

    def ids(self, entity: str, action: str) -> list[str]:
        frame = self.changes.get(entity)
        if frame is None:
            return []
        return frame["sourcedId"][frame["action"].eq(action)].tolist()


def empty_changes(entity: str) -> pd.DataFrame:
    columns = ["action", "sourcedId", *VALUE_COLUMNS[entity]]
    frame = pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    frame["row_hash"] = pd.Series(dtype="Int64")
    return frame


def compute_plan(
    district_id: str,
    roster: ResolvedRoster,
    store: StoreState,
    *,
    allowed_duplicates: set[str] | None = None,
) -> Plan:
    """Pure function: (resolved roster, store state) → plan (carrying every issue so far)."""
    issues: list[Issue] = list(roster.issues)
    changes: dict[str, pd.DataFrame] = {}
    scope = _deletion_scope(roster, store, issues)
    for entity in ENTITIES:
        changes[entity] = _entity_changes(entity, roster, store, scope[entity])
    duplicates = _hold_possible_duplicates(changes, store, allowed_duplicates or set(), issues)
    not_created = set(duplicates["sourcedId"]) | _keep_usernames_unique(changes, store, issues)
    _skip_enrollments_of(not_created, changes)
    _cascade_archives(changes, store, roster)
    membership = _membership_changes(changes["users"], store)
    return Plan(
        district_id,
        store.version,
        changes,
        issues,
        duplicates,
        membership,
        dict(roster.rows_read),
        before=_before_images(changes, store),
    )


def _before_images(changes: dict[str, pd.DataFrame], store: StoreState) -> dict[str, pd.DataFrame]:
    """Stored rows the plan changes, for entities whose state carries every ledger column."""
    out: dict[str, pd.DataFrame] = {}
    for entity, names in COMPLETE_STATE.items():
        frame = changes.get(entity)
        if frame is None or frame.empty:
            continue
        stored = store.frames[entity]
        rows = stored[isin(stored["sourcedId"], frame["sourcedId"].astype("str"))]
        out[entity] = rows[list(names)].set_axis(list(names.values()), axis=1)
    return out


# Entities whose state rows are whole before-images: state column -> store column.
COMPLETE_STATE = {
    "enrollments": {
        "sourcedId": "sourced_id",
        "class": "class_sourced_id",
        "user": "user_sourced_id",
        "role": "role",
        "status": "status",
        "row_hash": "row_hash",
    }
}


def _deletion_scope(
    roster: ResolvedRoster, store: StoreState, issues: list[Issue]
) -> dict[str, pd.Series]:
    """Per entity, a mask over the store frame: rows a bulk file's silence may archive."""
    schools = roster.delivered_schools
    known_locations = store.frames["locations"]
    missing = known_locations[
        known_locations["type"].eq("school")
        & known_locations["status"].eq("active")
        & ~isin(known_locations["sourcedId"], schools)
    ]
    for sourced_id in missing["sourcedId"]:
        issues.append(
            Issue(
                WARNING,
                "orgs.csv",
                0,
                "sourcedId",
                sourced_id,
                "school not delivered: its users, classes and enrollments are kept as they are",
            )
        )
    locs = known_locations
    # Locations are only archived when the delivery marks them tobedeleted.
    location_scope = pd.Series(False, index=locs.index)

    store_users = store.frames["users"]
    user_locations = store_users["locations"]
    single = ~user_locations.str.contains(",", regex=False)
    users_scope = pd.Series(False, index=store_users.index)
    users_scope[single] = isin(user_locations[single], schools) | (
        user_locations[single].eq("") & roster.district_delivered
    )
    for index, value in user_locations[~single].items():
        users_scope[index] = set(value.split(",")) <= schools

    store_classes = store.frames["classes"]
    classes_scope = isin(store_classes["location"], schools)

    store_enrollments = store.frames["enrollments"]
    # An enrollment is in scope when its (stored) class is at a delivered school.
    enrollment_scope = isin(store_enrollments["class"], store_classes["sourcedId"][classes_scope])
    return {
        "locations": location_scope,
        "users": users_scope,
        "classes": classes_scope,
        "enrollments": enrollment_scope,
    }


def _entity_changes(
    entity: str, roster: ResolvedRoster, store: StoreState, in_scope: pd.Series
) -> pd.DataFrame:
    mode = roster.modes[entity]
    stored = store.frames[entity]
    if mode == "absent":
        return empty_changes(entity)
    delivered = roster.frames[entity]
    # Position of each delivered row in the store frame (-1: new), by one hash lookup per row.
    position = _positions(delivered["sourcedId"], stored["sourcedId"])
    known = position >= 0
    # Statuses as boolean masks (no Python string per stored row).
    stored_active = stored["status"].eq("active").to_numpy(dtype=bool)
    stored_archived = stored["status"].eq("archived").to_numpy(dtype=bool)
    stored_hash = stored["row_hash"].to_numpy(dtype="int64")
    at = np.where(known, position, 0)
    new = ~known
    delivered_hash = delivered["row_hash"].to_numpy(dtype="int64")
    if len(stored):
        archived = known & stored_archived[at]
        changed = known & stored_active[at] & (stored_hash[at] != delivered_hash)
    else:
        archived = changed = np.zeros(len(delivered), dtype=bool)
    action = np.full(len(delivered), None, dtype=object)
    action[new] = "create"
    action[archived] = "restore"
    action[changed] = "update"
    acted = new | archived | changed
    upserts = delivered[acted]
    upserts.insert(0, "action", pd.Series(action[acted], index=upserts.index, dtype="object"))
    # Nullable Int64 keeps 63-bit hashes exact when archive rows (no hash) join the frame.
    upserts["row_hash"] = upserts["row_hash"].astype("Int64")

    active = stored["status"].eq("active")
    gone = isin(stored["sourcedId"], roster.removals[entity])
    if mode == "bulk":
        seen = np.zeros(len(stored), dtype=bool)
        seen[position[known]] = True
        gone |= ~seen & in_scope
    gone &= active & ~isin(stored["sourcedId"], roster.protected[entity])
    archives = _archive_rows(stored["sourcedId"][gone])
    frames = [f for f in (upserts, archives) if not f.empty]
    if not frames:
        return empty_changes(entity)
    # Every changes frame has the full column set, whatever mix of actions it holds.
    return pd.concat(frames, ignore_index=True).reindex(columns=empty_changes(entity).columns)


def _positions(ids: pd.Series, reference: pd.Series) -> np.ndarray:
    """For each id, its position in `reference` (unique ids), or -1."""
    if len(ids) == 0 or len(reference) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    found = pc.index_in(_strings(ids), value_set=_strings(reference))
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _strings(values: pd.Series) -> pa.Array:
    arr = pa.array(values.array if values.dtype == "str" else values.astype("str").array)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _archive_rows(sourced_ids: pd.Series) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "action": "archive",
            "sourcedId": sourced_ids.to_numpy(),
            "row_hash": pd.array([pd.NA] * len(sourced_ids), dtype="Int64"),
        }
    )


def _hold_possible_duplicates(
    changes: dict[str, pd.DataFrame],
    store: StoreState,
    allowed: set[str],
    issues: list[Issue],
) -> pd.DataFrame:
    """New accounts matching an existing one by username/email/identifier are not created."""
    users = changes["users"]
    creates = users[users["action"].eq("create") & ~isin(users["sourcedId"], allowed)]
    stored = store.frames["users"]
    found: list[pd.DataFrame] = []
    for column in ("username", "email", "identifier"):
        if creates.empty or stored.empty:
            break
        candidates = creates[creates[column].ne("")][["sourcedId", column]]
        existing = stored[stored[column].ne("")][["sourcedId", column]].rename(
            columns={"sourcedId": "matches"}
        )
        hits = candidates.merge(existing, on=column, how="inner")
        hits = hits[hits["matches"] != hits["sourcedId"]]
        if not hits.empty:
            found.append(hits[["sourcedId", "matches"]].assign(field=column))
    if not found:
        return pd.DataFrame(columns=["sourcedId", "matches", "field"])
    duplicates = (
        pd.concat(found, ignore_index=True)
        .drop_duplicates(["sourcedId", "matches"])
        .reset_index(drop=True)
    )
    for row in duplicates.itertuples(index=False):
        issues.append(
            Issue(
                WARNING,
                "users.csv",
                0,
                row.field,
                row.sourcedId,
                f"possible duplicate of existing account {row.matches} (same {row.field}); not "
                "created until support resolves it (capti-sync duplicates)",
            )
        )
    held = set(duplicates["sourcedId"])
    changes["users"] = users[~(users["action"].eq("create") & isin(users["sourcedId"], held))]
    return duplicates


_WRITES_VALUES = ("create", "update", "restore")


def _keep_usernames_unique(
    changes: dict[str, pd.DataFrame], store: StoreState, issues: list[Issue]
) -> set[str]:
    """A username belongs to one account of the district (archived ones keep theirs). A create,
    update or restore that would give an account a username another account holds after the
    plan is not applied (the account stays as it is; a new one is not created) and is reported.
    Swaps within one delivery are fine: only the usernames after the whole plan count.
    Returns the sourcedIds whose creation was refused."""
    users = changes["users"]
    writes = users[isin(users["action"].astype("str"), _WRITES_VALUES)]
    if writes.empty:
        return set()
    stored = store.frames["users"][["sourcedId", "username"]]
    # Only the written accounts' stored usernames are looked up (not an index of all of them).
    touched = stored[isin(stored["sourcedId"], writes["sourcedId"].astype("str"))]
    previous = touched.set_index("sourcedId")["username"]
    refused: set[str] = set()
    while True:
        # Usernames this plan gives (creates, and updates/restores that change it).
        was = previous.reindex(writes["sourcedId"]).to_numpy(dtype=object)
        introduced = writes[writes["username"].to_numpy(dtype=object) != was]
        if introduced.empty:
            break
        names = introduced["username"].astype("str")
        kept = stored[~isin(stored["sourcedId"], writes["sourcedId"])]
        after = pd.concat(
            [kept[isin(kept["username"], names)], writes[["sourcedId", "username"]]],
            ignore_index=True,
        )
        after = after[isin(after["username"], names)]
        taken = after[after["username"].duplicated(keep=False)]
        clashing = introduced[isin(introduced["sourcedId"], taken["sourcedId"])]
        if clashing.empty:
            break
        holders = taken.groupby("username")["sourcedId"].agg(lambda ids: sorted(ids))
        for row in clashing.itertuples(index=False):
            others = [o for o in holders[row.username] if o != row.sourcedId]
            what = "not created" if row.action == "create" else f"{row.action} not applied"
            issues.append(
                Issue(
                    WARNING,
                    "users.csv",
                    0,
                    "username",
                    row.sourcedId,
                    f"username {row.username} is already used by account {', '.join(others)} "
                    f"in this district; {what} (usernames are unique within a district)",
                )
            )
            if row.action == "create":
                refused.add(row.sourcedId)
        writes = writes[~isin(writes["sourcedId"], clashing["sourcedId"])]
        users = users[~isin(users["sourcedId"], clashing["sourcedId"])]
    changes["users"] = users
    return refused


def _skip_enrollments_of(not_created: set[str], changes: dict[str, pd.DataFrame]) -> None:
    """Enrollments can only point at accounts that exist: none is created, moved or restored
    onto a user the plan does not create."""
    if not not_created:
        return
    enrollments = changes["enrollments"]
    onto = ~enrollments["action"].eq("archive") & isin(
        enrollments["user"].astype("str"), not_created
    )
    changes["enrollments"] = enrollments[~onto]


def _cascade_archives(
    changes: dict[str, pd.DataFrame], store: StoreState, roster: ResolvedRoster
) -> None:
    """Archiving a user or class ends its enrollments, even if the enrollments file is silent."""
    archived_users = set(changes["users"]["sourcedId"][changes["users"]["action"].eq("archive")])
    archived_classes = set(
        changes["classes"]["sourcedId"][changes["classes"]["action"].eq("archive")]
    )
    if not archived_users and not archived_classes:
        return
    enrollments = changes["enrollments"]
    stored = store.frames["enrollments"]
    ending = stored[
        stored["status"].eq("active")
        & (isin(stored["user"], archived_users) | isin(stored["class"], archived_classes))
        & ~isin(stored["sourcedId"], enrollments["sourcedId"])
    ]
    if ending.empty:
        return
    extra = _archive_rows(ending["sourcedId"])
    combined = pd.concat([f for f in (enrollments, extra) if not f.empty], ignore_index=True)
    changes["enrollments"] = combined.reindex(columns=empty_changes("enrollments").columns)


def _membership_changes(user_changes: pd.DataFrame, store: StoreState) -> dict[str, int]:
    """Memberships (user, school) the plan adds and ends: per changed user, the schools after
    minus the schools before (active stored users only), and the other way round."""
    if user_changes.empty:
        return {"added": 0, "ended": 0}
    stored = store.frames["users"]
    stored = stored[isin(stored["sourcedId"], user_changes["sourcedId"])]
    before = stored["locations"].where(stored["status"].eq("active"), "")
    old = location_pairs(stored["sourcedId"], before).drop(columns="row")
    after = user_changes["locations"].astype("object").fillna("").astype("str")
    after = after.where(~user_changes["action"].eq("archive").to_numpy(), "")
    new = location_pairs(user_changes["sourcedId"], after)
    added = new.merge(old, on=["user", "location"], how="left", indicator=True)
    listed = pd.DataFrame(
        {"row": np.arange(len(user_changes)), "user": user_changes["sourcedId"].to_numpy(object)}
    )
    old_per_row = old.merge(listed, on="user")
    ended = old_per_row.merge(new, on=["row", "user", "location"], how="left", indicator=True)
    return {
        "added": int(added["_merge"].eq("left_only").sum()),
        "ended": int(ended["_merge"].eq("left_only").sum()),
    }


def location_pairs(users: pd.Series, locations: pd.Series) -> pd.DataFrame:
    """Distinct (row, user, location) of comma-joined location lists (row: position in
    `users`). Most users have one school: only list cells are split."""
    users = users.reset_index(drop=True)
    locations = locations.reset_index(drop=True).astype("object").fillna("").astype("str")
    rows = np.arange(len(users))
    multi = locations.str.contains(",", regex=False).to_numpy(dtype=bool)
    single = ~multi & locations.ne("").to_numpy(dtype=bool)
    parts = [
        pd.DataFrame(
            {"row": rows[single], "user": users[single].array, "location": locations[single].array}
        )
    ]
    if multi.any():
        split = pd.DataFrame(
            {
                "row": rows[multi],
                "user": users[multi].to_numpy(dtype=object),
                "location": locations[multi].str.split(",").to_numpy(dtype=object),
            }
        ).explode("location")
        split = split[split["location"].notna() & split["location"].ne("")]
        parts.append(
            split.drop_duplicates(["row", "location"]).astype({"user": "str", "location": "str"})
        )
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def filter_adds_only(plan: Plan) -> tuple[Plan, dict[str, int]]:
    """Summer-rollover mode: keep creates, drop updates, archives and restores."""
    skipped: dict[str, int] = {}
    kept: dict[str, pd.DataFrame] = {}
    for entity, frame in plan.changes.items():
        creates = frame["action"].eq("create")
        skipped[entity] = int((~creates).sum())
        kept[entity] = frame[creates].reset_index(drop=True)
    created_users = kept["users"]
    added = sum(len([x for x in str(v).split(",") if x]) for v in created_users["locations"])
    filtered = Plan(
        plan.district_id,
        plan.base_version,
        kept,
        list(plan.issues),
        plan.duplicates,
        {"added": added, "ended": 0},
        dict(plan.rows_read),
        skipped,
        plan.before,
    )
    return filtered, skipped
