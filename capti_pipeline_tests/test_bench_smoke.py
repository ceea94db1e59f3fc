"""Smoke test of the benchmark command: a small district, every measurement present and sane.

No timing assertions: only that the benchmark measures what it claims to (floor, first import,
no-change and 1 % change runs through the Dagster job), with consistent ratios and row counts.
"""

import json
from pathlib import Path

import pytest

from capti_pipeline import bench

pytestmark = pytest.mark.slow


def test_bench_measures_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--students",
                "300",
                "--no-overhead",
                "--workdir",
                str(tmp_path / "w"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    payload = json.loads(out.read_text())
    assert payload["machine"]["cores"] >= 1
    [result] = payload["results"]
    assert result["students"] == 300 and result["database"] == "sqlite"
    assert result["rows"]["enrollments"] > 300
    floor = result["floor_seconds"]
    runs = sorted(f["seconds"] for f in result["floor"])
    assert floor > 0 and len(runs) == bench.FLOOR_RUNS_BEFORE + bench.FLOOR_RUNS_AFTER
    assert floor == runs[len(runs) // 2]  # the median
    assert result["floor_range_seconds"] == [runs[0], runs[-1]]

    phases = result["phases"]
    assert set(phases) == {"first", "nochange", "change"}
    for name, phase in phases.items():
        assert phase["seconds"] > 0, name
        assert phase["ratio"] == pytest.approx(phase["seconds"] / floor), name
        assert phase["peak_rss_bytes"] > 10 * 2**20, name
        assert phase["process_seconds"] >= phase["seconds"], name
        assert "applied_roster_changes" in phase["steps"] or name == "nochange"
        assert not phase["holds"], (name, phase["reason"])

    first, nochange, change = phases["first"], phases["nochange"], phases["change"]
    assert first["state"] == "applied"
    total_rows = sum(result["rows"][k] for k in ("users", "enrollments", "classes"))
    assert first["rows_written"] >= total_rows * 0.9
    assert first["rows_changed"] == first["rows_written"]
    assert nochange["state"] == "no_changes"
    assert nochange["rows_written"] == 0 and nochange["rows_changed"] == 0
    assert change["state"] == "applied"
    assert 0 < change["rows_changed"] <= change["rows_written"]
    assert change["rows_written"] <= 1.1 * change["rows_changed"]

    markdown = bench.to_markdown(payload)
    for label in (
        "floor (read_csv; median of 5",
        "first import",
        "no-change nightly",
        "1 % change",
    ):
        assert label in markdown


def test_markdown_output_keeps_the_surrounding_text(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nintro\n\n<!-- bench:results:begin -->\nold\n<!-- bench:results:end -->\n\nafter\n"
    )
    payload = {
        "measured_at": "now",
        "command": "--students 1",
        "machine": bench.machine_description(),
        "results": [],
        "overhead": [],
    }
    bench.write_output(doc, payload)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.rstrip().endswith("after")
    assert "old" not in text and "## Measured results" in text
