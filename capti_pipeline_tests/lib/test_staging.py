"""Step outputs survive the trip through staging files exactly, owner-only, without copies."""

import os
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
    with pytest.raises(staging.StagingError, match="not a staging file"):
        staging.load(path)


def big_frame(rows: int = 300_000) -> pd.DataFrame:
    text = pd.Series(pa.array([f"id-{i:0>200}" for i in range(rows)], type=pa.large_string()))
    return pd.DataFrame({"text": text.astype("str"), "n": np.arange(rows)})


def test_a_file_names_the_run_that_wrote_it(tmp_path: Path):
    path = tmp_path / "staging" / "asset" / "d.stg"
    staging.dump({"night": 1}, path, run_id="run-1")
    assert staging.load(path, run_id="run-1") == {"night": 1}
    staging.dump({"night": 2}, path, run_id="run-2")
    with pytest.raises(staging.StagingError, match="output of run run-2, not of run run-1"):
        staging.load(path, run_id="run-1")


def test_handoff_gives_the_object_in_process_and_the_file_after(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(staging, "BACKGROUND_BYTES", 1024)
    handoff = staging.Handoff()
    path = tmp_path / "staging" / "validated" / "d.stg"
    frame = big_frame()
    handoff.put(path, {"frames": {"users": frame}}, "run-1")
    assert handoff.get(path, "run-1")["frames"]["users"] is frame  # no write waited for
    handoff.finish()
    loaded = staging.load(path, run_id="run-1")
    pd.testing.assert_frame_equal(loaded["frames"]["users"], frame)
    # Another process (or a later re-execution) expecting that run reads the file.
    assert staging.Handoff().get(path, "run-1")["frames"]["users"]["n"].iloc[-1] == len(frame) - 1


def test_a_failed_background_write_is_raised_by_the_next_output(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(staging, "BACKGROUND_BYTES", 1024)
    handoff = staging.Handoff()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the staging folder should be")
    handoff.put(blocked / "asset" / "d.stg", {"frame": big_frame(20_000)}, "run-1")
    with pytest.raises(OSError):
        handoff.put(tmp_path / "staging" / "next" / "d.stg", {"small": 1}, "run-1")


def test_small_outputs_are_on_disk_when_put_returns(tmp_path: Path):
    handoff = staging.Handoff()
    path = tmp_path / "staging" / "report" / "d.stg"
    handoff.put(path, {"state": "applied"}, "run-1")
    assert staging.load(path, run_id="run-1") == {"state": "applied"}


def test_each_run_has_its_own_file_and_only_the_latest_runs_are_kept(tmp_path: Path):
    folder = tmp_path / "staging" / "asset" / "d"
    handoff = staging.Handoff()
    for night in range(1, 6):
        handoff.put(folder / f"run-{night}.stg", {"night": night}, f"run-{night}")
        os.utime(folder / f"run-{night}.stg", (night, night))  # distinct, ordered mtimes
    handoff.finish()
    staging.prune(folder)
    kept = sorted(p.name for p in folder.iterdir())
    assert kept == ["run-3.stg", "run-4.stg", "run-5.stg"]
    assert staging.load(staging.run_file(folder, "run-4"), run_id="run-4") == {"night": 4}
    assert staging.load(staging.run_file(folder, None)) == {"night": 5}  # the newest
