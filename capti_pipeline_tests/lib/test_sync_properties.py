"""Property-based tests of the pure resolve → diff → apply functions.

For any sequence of bulk deliveries: applying the diff of (store, delivery) makes the store equal
the delivery's roster; a second diff is empty; an archived user who returns keeps its account.
"""

import itertools
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as strat

from capti_pipeline.lib import state as state_mod
from capti_pipeline.lib import store as st
from capti_pipeline.lib.apply import apply_plan
from capti_pipeline.lib.diff import compute_plan
from capti_pipeline.lib.resolve import resolve_roster
from capti_pipeline.lib.state import load_state
from capti_pipeline.lib.validate import ValidatedDelivery
from capti_pipeline_tests.support.state_check import assert_snapshot_matches_tables

SCHOOLS = ["s1", "s2", "s3"]
USER_POOL = [f"u{n}" for n in range(12)]
CLASS_POOL = [f"c{n}" for n in range(4)]
_counter = itertools.count()

user_rows = strat.fixed_dictionaries(
    {
        "role": strat.sampled_from(["student", "teacher", "administrator"]),
        "orgs": strat.lists(
            strat.sampled_from([*SCHOOLS, "dist"]), min_size=1, max_size=3, unique=True
        ),
        "givenName": strat.sampled_from(["Ana", "Zoë", "José", "Li"]),
        "familyName": strat.sampled_from(["Ng", "O'Brien", "Smith"]),
        "enabled": strat.booleans(),
        "grades": strat.sampled_from(["", "KG", "03", "09,10"]),
    }
)
delivery_strategy = strat.fixed_dictionaries(
    {
        "users": strat.dictionaries(
            strat.sampled_from(USER_POOL), user_rows, max_size=len(USER_POOL)
        ),
        "classes": strat.dictionaries(
            strat.sampled_from(CLASS_POOL), strat.sampled_from(SCHOOLS), max_size=4
        ),
        "enrollment_picks": strat.lists(
            strat.tuples(strat.sampled_from(CLASS_POOL), strat.sampled_from(USER_POOL)), max_size=20
        ),
    }
)


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return (
        pd.DataFrame(rows, columns=columns, dtype="str")
        if rows
        else pd.DataFrame(columns=columns, dtype="str")
    )


def as_validated(delivery: dict) -> ValidatedDelivery:
    """A bulk 1.1 delivery built directly in validated form (validation has its own tests)."""
    orgs = [
        {
            "sourcedId": "dist",
            "status": "",
            "name": "District",
            "type": "district",
            "parentSourcedId": "",
        }
    ]
    orgs += [
        {
            "sourcedId": s,
            "status": "",
            "name": s.upper(),
            "type": "school",
            "parentSourcedId": "dist",
        }
        for s in SCHOOLS
    ]
    users = [
        {
            "sourcedId": sid,
            "status": "",
            "enabledUser": "true" if row["enabled"] else "false",
            "orgSourcedIds": ",".join(row["orgs"]),
            "role": row["role"],
            "username": f"user-{sid}",
            "givenName": row["givenName"],
            "familyName": row["familyName"],
            "identifier": f"0{sid[1:]}",
            "email": f"{sid}@example.org",
            "grades": row["grades"],
        }
        for sid, row in sorted(delivery["users"].items())
    ]
    classes = [
        {
            "sourcedId": cid,
            "status": "",
            "title": f"Class {cid}",
            "classType": "scheduled",
            "schoolSourcedId": school,
        }
        for cid, school in sorted(delivery["classes"].items())
    ]
    enrollments = []
    for cid, uid in dict.fromkeys(delivery["enrollment_picks"]):
        if cid in delivery["classes"] and uid in delivery["users"]:
            enrollments.append(
                {
                    "sourcedId": f"e-{cid}-{uid}",
                    "status": "",
                    "classSourcedId": cid,
                    "schoolSourcedId": delivery["classes"][cid],
                    "userSourcedId": uid,
                    "role": "student",
                    "primary": "",
                }
            )
    frames = {
        "orgs": _frame(orgs, ["sourcedId", "status", "name", "type", "parentSourcedId"]),
        "users": _frame(
            users,
            [
                "sourcedId",
                "status",
                "enabledUser",
                "orgSourcedIds",
                "role",
                "username",
                "givenName",
                "familyName",
                "identifier",
                "email",
                "grades",
            ],
        ),
        "classes": _frame(
            classes, ["sourcedId", "status", "title", "classType", "schoolSourcedId"]
        ),
        "enrollments": _frame(
            enrollments,
            [
                "sourcedId",
                "status",
                "classSourcedId",
                "schoolSourcedId",
                "userSourcedId",
                "role",
                "primary",
            ],
        ),
    }
    modes = {f: "bulk" for f in ("orgs.csv", "users.csv", "classes.csv", "enrollments.csv")}
    protected = {e: set() for e in ("orgs", "users", "classes", "enrollments", "roles")}
    return ValidatedDelivery("1.1", modes, frames, protected, [], {})


def active_roster(engine, district_id: str) -> dict[str, set]:
    """The store's active records, as comparable tuples."""
    with engine.connect() as conn:
        frames = {e: st.read_full_rows(conn, district_id, e) for e in st.ROSTER_TABLES}
    out = {}
    for entity, frame in frames.items():
        active = frame[frame["status"] == "active"]
        columns = ["sourced_id", *st.COLUMN_NAMES[entity].values()]
        out[entity] = set(active[columns].astype(str).itertuples(index=False, name=None))
    return out


def expected_roster(roster) -> dict[str, set]:
    out = {}
    for entity, frame in roster.frames.items():
        columns = ["sourcedId", *st.COLUMN_NAMES[entity].keys()]
        out[entity] = set(frame[columns].astype(str).itertuples(index=False, name=None))
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    path = Path(tmp_path_factory.mktemp("props")) / "store.sqlite3"
    engine = st.create_store_engine(f"sqlite:///{path}")
    st.migrate(engine)
    return engine


def sync_once(engine, district_id: str, delivery: dict):
    roster = resolve_roster(as_validated(delivery))
    with engine.connect() as conn:
        state = load_state(conn, district_id)
    plan = compute_plan(district_id, roster, state)
    with engine.connect() as conn:
        # Before-images the plan carries (the apply's ledger uses them) are the stored rows.
        for entity, before in plan.before.items():
            stored = st.read_full_rows(conn, district_id, entity, before["sourced_id"].tolist())
            expected = stored[list(before.columns)].sort_values("sourced_id")
            assert sorted(before.astype(str).itertuples(index=False)) == sorted(
                expected.astype(str).itertuples(index=False)
            )
            changed = set(plan.changes[entity]["sourcedId"]) & set(stored["sourced_id"])
            assert set(before["sourced_id"]) == changed
    with engine.begin() as conn:
        apply_plan(conn, plan, f"run-{next(_counter)}")
    return roster


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(deliveries=strat.lists(delivery_strategy, min_size=1, max_size=4))
@pytest.mark.parametrize("compact_below", [None, 0], ids=["delta-layers", "always-compact"])
def test_applying_the_diff_makes_the_store_equal_the_delivery(
    engine, deliveries, compact_below, monkeypatch
):
    if compact_below is not None:  # every apply rewrites the full snapshot
        monkeypatch.setattr(state_mod, "COMPACT_FRACTION", 0.0)
        monkeypatch.setattr(state_mod, "_COMPACT_MIN_ROWS", compact_below)
    district_id = f"prop-{next(_counter)}"
    with engine.begin() as conn:
        st.upsert_district(conn, district_id, source_url="/nowhere")
    accounts: dict[str, int] = {}
    for delivery in deliveries:
        roster = sync_once(engine, district_id, delivery)
        assert active_roster(engine, district_id) == expected_roster(roster)

        # A second diff of the same delivery is empty.
        state = assert_snapshot_matches_tables(engine, district_id)
        with engine.connect() as conn:
            users = st.read_full_rows(conn, district_id, "users")
        assert compute_plan(district_id, roster, state).is_empty()

        # Every sourcedId keeps the account it first got, through archive and restore.
        for sourced_id, account in zip(users["sourced_id"], users["id"], strict=True):
            assert accounts.setdefault(sourced_id, int(account)) == int(account)
        gone = set(users["sourced_id"][users["status"].eq("archived")])
        assert gone == set(accounts) - set(roster.frames["users"]["sourcedId"])
