"""Step outputs survive the trip through staging files exactly, owner-only, without copies."""

import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from capti_pipeline.lib import staging
from capti_pipeline.lib.diff import Plan, empty_changes


def mixed_frame() -> pd.DataFrame:
    chunked = pa.chunked_array([["a", "bé"], [], ["", "x" * 100]], type=pa.large_string())
    index = pd.Index([2, 5, 7, 9])
    return pd.DataFrame(
        {
            "text": pd.Series(pd.array(chunked, dtype="str"), index=index),
            "flag": [True, False, True, False],
            "count": pd.array([1, None, 3, 2**62 + 1], dtype="Int64"),
            "hash": np.array([2**63 - 1, 0, -5, 7], dtype="int64"),
            "action": pd.Series(["create", None, "archive", "update"], dtype="object"),
        },
        index=index,
    )


def test_round_trip_keeps_values_dtypes_and_index(tmp_path: Path):
    frame = mixed_frame()
    plan = Plan("d", 3, {"users": frame, "classes": empty_changes("classes")}, [], rows_read={})
    path = tmp_path / "staging" / "roster_diff" / "d.stg"
    staging.dump({"plan": plan, "ids": {"u1", "u2"}, "n": 4}, path)
    loaded = staging.load(path)
    assert loaded["ids"] == {"u1", "u2"} and loaded["n"] == 4
    pd.testing.assert_frame_equal(loaded["plan"].changes["users"], frame)
    pd.testing.assert_frame_equal(loaded["plan"].changes["classes"], empty_changes("classes"))
    # The chunks of a pyarrow column are kept as they were (no gluing on the way out).
    assert loaded["plan"].changes["users"]["text"].array._pa_array.num_chunks == 3


def test_files_are_owner_only_and_loaded_data_is_writable_without_touching_the_file(
    tmp_path: Path,
):
    path = tmp_path / "staging" / "asset" / "d.stg"
    staging.dump(mixed_frame(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = staging.load(path)
    loaded.loc[2, "hash"] = 1  # numpy data maps the file copy-on-write
    loaded.loc[2, "text"] = "changed"
    again = staging.load(path)
    assert again.loc[2, "hash"] == 2**63 - 1 and again.loc[2, "text"] == "a"


def test_a_failed_write_leaves_the_previous_output(tmp_path: Path):
    path = tmp_path / "staging" / "asset" / "d.stg"
    staging.dump({"night": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        staging.dump({"night": 2, "bad": Unpicklable()}, path)
    assert staging.load(path) == {"night": 1}
    assert [p.name for p in path.parent.iterdir()] == ["d.stg"]  # no partial file left


def test_a_foreign_file_is_refused(tmp_path: Path):
    path = tmp_path / "x.stg"
    path.write_bytes(b"not a staging file at all, definitely not")
    with pytest.raises(ValueError, match="not a staging file"):
        staging.load(path)
