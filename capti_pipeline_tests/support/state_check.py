"""Checks that the state snapshot every apply records equals the roster tables it describes."""

from sqlalchemy.engine import Engine

from capti_pipeline.lib import state as state_mod
from capti_pipeline.lib.state import StoreState


def comparable(state: StoreState) -> dict[str, list[tuple]]:
    out = {}
    for entity, frame in state.frames.items():
        columns = state_mod.columns_of(entity)
        rows = frame[columns].astype({"row_hash": "int64"}).astype({c: "str" for c in columns[3:]})
        out[entity] = sorted(rows.astype(object).itertuples(index=False, name=None))
    return out


def assert_same_state(snapshot: StoreState, scanned: StoreState) -> None:
    assert snapshot.version == scanned.version
    assert comparable(snapshot) == comparable(scanned)


def assert_snapshot_matches_tables(engine: Engine, district_id: str) -> StoreState:
    """The snapshot is current (used, not bypassed) and equal to a scan of the tables."""
    with engine.connect() as conn:
        version, head = state_mod._versions(conn, district_id)
        assert head is not None and head["roster_version"] == version, (version, head)
        snapshot = state_mod.load_state(conn, district_id)
        scanned = state_mod.scan_state(conn, district_id)
    assert_same_state(snapshot, scanned)
    return snapshot
