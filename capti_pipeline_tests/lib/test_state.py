"""The recorded state snapshot: layers, compaction, backfill, and the fallback to the tables."""

from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from capti_pipeline.lib import state
from capti_pipeline.lib import store as st
from capti_pipeline.lib.apply import apply_plan
from capti_pipeline.lib.diff import compute_plan
from capti_pipeline.lib.resolve import resolve_roster
from capti_pipeline_tests.lib.test_sync_properties import as_validated
from capti_pipeline_tests.support.state_check import (
    assert_same_state,
    assert_snapshot_matches_tables,
)


def user(orgs=("s1",), family="Ng"):
    return {
        "role": "student",
        "orgs": list(orgs),
        "givenName": "Ana",
        "familyName": family,
        "enabled": True,
        "grades": "03",
    }


def delivery(users: dict, classes=None, picks=()):
    return {"users": users, "classes": classes or {"c1": "s1"}, "enrollment_picks": list(picks)}


@pytest.fixture
def engine(tmp_path: Path):
    engine = st.create_store_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    st.migrate(engine)
    with engine.begin() as conn:
        st.upsert_district(conn, "d", source_url="/nowhere")
    return engine


def sync(engine, payload: dict) -> None:
    roster = resolve_roster(as_validated(payload))
    with engine.connect() as conn:
        plan = compute_plan("d", roster, state.load_state(conn, "d"))
    with engine.begin() as conn:
        apply_plan(conn, plan, f"run-{len(payload['users'])}-{id(payload)}")


def layer_kinds(engine) -> list[tuple[int, str, str]]:
    layers = st.state_layers
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(layers.c.roster_version, layers.c.entity, layers.c.kind).order_by(
                layers.c.roster_version, layers.c.entity
            )
        ).all()
    return [tuple(r) for r in rows]


def test_applies_record_delta_layers_then_compact(engine, monkeypatch):
    sync(engine, delivery({"u1": user(), "u2": user()}, picks=[("c1", "u1")]))
    assert {kind for _v, _e, kind in layer_kinds(engine)} == {"full"}
    # A rename, an archive (u2 left) and a new user: small deltas on top of the full image.
    sync(engine, delivery({"u1": user(family="Li"), "u3": user()}, picks=[("c1", "u1")]))
    sync(engine, delivery({"u1": user(family="Li"), "u2": user(), "u3": user(("s2",))}))
    kinds = layer_kinds(engine)
    assert {(v, kind) for v, _e, kind in kinds} == {(1, "full"), (2, "delta"), (3, "delta")}
    snapshot = assert_snapshot_matches_tables(engine, "d")
    users = snapshot.frames["users"].set_index("sourcedId")
    assert users.loc["u2", "status"] == "active" and users.loc["u3", "locations"] == "s2"
    assert snapshot.frames["enrollments"]["status"].tolist() == ["archived"]

    # Past the compaction threshold the next apply writes a new full image and drops the rest.
    monkeypatch.setattr(state, "_COMPACT_MIN_ROWS", 0)
    monkeypatch.setattr(state, "COMPACT_FRACTION", 0.0)
    sync(engine, delivery({"u1": user()}))
    assert {(v, kind) for v, _e, kind in layer_kinds(engine)} == {(4, "full")}
    assert_snapshot_matches_tables(engine, "d")


def test_a_store_without_snapshot_is_scanned_then_backfilled(engine):
    sync(engine, delivery({"u1": user(), "u2": user()}, picks=[("c1", "u2")]))
    with engine.begin() as conn:  # as a store written before snapshots existed
        conn.execute(st.state_layers.delete())
        conn.execute(st.state_heads.delete())
        assert state.read_snapshot_state(conn, "d") is None
        scanned = state.scan_state(conn, "d")
    loaded = state.load_state_and_backfill(engine, "d")
    assert_same_state(loaded, scanned)
    with engine.connect() as conn:
        assert state.read_snapshot_state(conn, "d") is not None
    assert_snapshot_matches_tables(engine, "d")


def test_a_scan_overtaken_by_an_apply_is_not_recorded(engine, monkeypatch):
    sync(engine, delivery({"u1": user()}))
    with engine.begin() as conn:
        conn.execute(st.state_layers.delete())
        conn.execute(st.state_heads.delete())
    real_scan = state.scan_state
    overtaken: list[bool] = []

    def scan_then_someone_applies(conn, district_id):
        scanned = real_scan(conn, district_id)
        if not overtaken:
            overtaken.append(True)
            sync(engine, delivery({"u1": user(), "u9": user()}))  # commits version 2
        return scanned

    monkeypatch.setattr(state, "scan_state", scan_then_someone_applies)
    stale = state.load_state_and_backfill(engine, "d")
    monkeypatch.setattr(state, "scan_state", real_scan)
    assert stale.version == 1
    # The apply in between recorded version 2; the stale scan did not overwrite it.
    snapshot = assert_snapshot_matches_tables(engine, "d")
    assert snapshot.version == 2 and "u9" in set(snapshot.frames["users"]["sourcedId"])


def test_a_stale_head_is_never_trusted(engine):
    sync(engine, delivery({"u1": user()}))
    with engine.begin() as conn:  # the version moved without a snapshot (not via apply_plan)
        conn.execute(st.districts.update().values(roster_version=7))
        assert state.read_snapshot_state(conn, "d") is None
        assert state.load_state(conn, "d").version == 7


def frame(rows: list[tuple]) -> pd.DataFrame:
    columns = ["sourcedId", "op", "status", "row_hash", "class", "user"]
    out = pd.DataFrame(rows, columns=columns).astype({c: "str" for c in columns if c != "row_hash"})
    return out.astype({"row_hash": "int64"})


def test_collapsed_deltas_keep_the_last_word_per_id():
    first = frame(
        [
            ("e1", "upsert", "active", 11, "c1", "u1"),
            ("e2", "upsert", "active", 12, "c1", "u2"),
            ("e3", "archive", "", 0, "", ""),
        ]
    )
    second = frame(
        [
            ("e1", "archive", "", 0, "", ""),  # upserted then archived: archived, new values
            ("e2", "delete", "", 0, "", ""),  # created then undone
            ("e4", "archive", "", 0, "", ""),
        ]
    )
    combined = state.collapse([first, second]).set_index("sourcedId")
    assert combined.loc["e1"].tolist() == ["upsert", "archived", 11, "c1", "u1"]
    assert combined.loc["e2", "op"] == "delete"
    assert combined.loc["e3", "op"] == "archive" and combined.loc["e4", "op"] == "archive"

    base = frame(
        [
            ("e1", "", "active", 1, "c0", "u1"),
            ("e3", "", "active", 3, "c0", "u3"),
            ("e5", "", "active", 5, "c0", "u5"),
        ]
    ).drop(columns="op")
    merged = state.apply_delta(base, state.collapse([first, second])).set_index("sourcedId")
    assert merged.loc["e1"].tolist() == ["archived", 11, "c1", "u1"]
    assert merged.loc["e3"].tolist() == ["archived", 3, "c0", "u3"]  # values kept, archived
    assert merged.loc["e5"].tolist() == ["active", 5, "c0", "u5"]
    assert "e2" not in merged.index and merged["row_hash"].dtype == "int64"


def test_an_unreadable_snapshot_is_rescanned_and_rewritten(engine):
    sync(engine, delivery({"u1": user(), "u2": user()}))
    with engine.begin() as conn:
        conn.execute(st.state_layers.update().values(data=b"not an arrow file"))
        assert state.read_snapshot_state(conn, "d") is None
    assert set(state.load_state_and_backfill(engine, "d").frames["users"]["sourcedId"]) == {
        "u1",
        "u2",
    }
    assert_snapshot_matches_tables(engine, "d")
