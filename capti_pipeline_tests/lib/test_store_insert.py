"""Bulk inserts: every row, in the requested order, with its constants, on SQLite and PostgreSQL."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from capti_pipeline.lib import store as st


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> sa.Engine:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'roster.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = st.create_store_engine(url)
    st.migrate(engine)
    return engine


def enrollment_rows(count: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sourced_id": [f"e{i:05d}" for i in range(count)],
            # Quotes, commas, non-ASCII and an empty string survive the JSON / CSV transport.
            "class_sourced_id": ["c,1", 'c"2', "klasse-ä", ""] * (count // 4),
            "user_sourced_id": [f"u{i % 7}" for i in range(count)],
            "role": "student",
            "row_hash": np.arange(count, dtype="int64") - count // 2,  # negatives too
        }
    ).astype({c: "str" for c in ("sourced_id", "class_sourced_id", "user_sourced_id", "role")})


def test_batches_insert_every_row_in_order_with_constants(engine, monkeypatch) -> None:
    monkeypatch.setattr(st, "_INSERT_BATCH", 7)  # many batches, the last one short
    frame = enrollment_rows(100)
    order = np.random.default_rng(3).permutation(len(frame))
    constants = {"district_id": "d1", "status": "active", "created_run": "r1", "updated_run": "r1"}
    with engine.begin() as conn:
        assert st.insert_frame(conn, "enrollments", frame, constants, order) == 100

    with engine.connect() as conn:
        stored = pd.DataFrame(
            conn.execute(sa.select(st.enrollments).order_by(st.enrollments.c.id)).mappings().all()
        )
    expected = frame.take(order).reset_index(drop=True)
    for column in frame.columns:  # ids were given in `order`
        assert stored[column].tolist() == expected[column].tolist(), column
    for column, value in constants.items():
        assert set(stored[column]) == {value}


def test_a_failing_batch_fails_the_insert_and_the_transaction(engine, monkeypatch) -> None:
    monkeypatch.setattr(st, "_INSERT_BATCH", 7)
    frame = enrollment_rows(40)
    frame.loc[30, "sourced_id"] = frame.loc[3, "sourced_id"]  # unique key broken in batch 5
    constants = {"district_id": "d1", "status": "active", "created_run": "r1", "updated_run": "r1"}
    # SQLAlchemy's IntegrityError on SQLite, psycopg's UniqueViolation from the COPY on PostgreSQL
    with pytest.raises(Exception, match=r"(?i)unique"), engine.begin() as conn:
        st.insert_frame(conn, "enrollments", frame, constants)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(st.enrollments)).scalar() == 0
