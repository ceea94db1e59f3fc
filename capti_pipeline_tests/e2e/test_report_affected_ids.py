"""`capti-sync report`: the counts are always right; JSON and CSV list every affected sourcedId
of a held or dry-run plan (read from the stored plan), Markdown shows a marked sample."""

import csv
import io
import json
from pathlib import Path

import pytest

from capti_pipeline.lib.generator import DistrictSpec, generate_district
from capti_pipeline_tests.support.harness import CaptiEnv
from capti_pipeline_tests.support.operator import (
    NO_THRESHOLDS,
    Cli,
    deliver,
    keep_users,
)


@pytest.fixture
def big_cut(capti_env: CaptiEnv) -> tuple[CaptiEnv, list[str], Path]:
    district = generate_district(
        DistrictSpec(district_id="many", students=400, students_per_school=200, seed=8)
    )
    folder = deliver(capti_env, district, "many")
    capti_env.register("many", folder)
    assert capti_env.run("many").state == "applied"
    cut = keep_users(folder, 0.3)
    assert len(cut) > 250
    return capti_env, cut, folder


@pytest.mark.parametrize("dry_run", [False, True], ids=["held", "dry_run"])
def test_report_lists_every_affected_sourced_id(big_cut, cli_run: Cli, dry_run: bool) -> None:
    env, cut, _ = big_cut
    outcome = env.run("many", dry_run=dry_run)
    assert outcome.state == ("dry_run" if dry_run else "held")
    total = len(cut)
    assert outcome.report["counts"]["users"]["archive"] == total

    code, out = cli_run("report", "many")
    assert code == 0
    assert f"- users archive ({total}): " in out
    assert f"… and {total - 50} more (--format csv for all)" in out
    if not dry_run:
        [hold] = [h for h in outcome.report["holds"] if h["entity"] == "users"]
        assert hold["count"] == total and f"users archive: {total} of" in hold["message"]

    code, out = cli_run("report", "many", "--format", "json")
    report = json.loads(out)
    assert sorted(report["affected"]["users"]["archive"]) == sorted(cut)
    assert report["affected_complete"] is True

    code, out = cli_run("report", "many", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    archived = [
        r["sourcedId"]
        for r in rows
        if r["severity"] == "change" and r["message"] == "users archive"
    ]
    assert sorted(archived) == sorted(cut)
    assert all(r["file"] == "users.csv" for r in rows if r["message"] == "users archive")


def test_applied_report_counts_are_right_and_the_sample_is_marked(big_cut, cli_run) -> None:
    env, cut, _ = big_cut
    cli_run("district", "set", "many", "--thresholds", NO_THRESHOLDS)
    cli_run("district", "set", "many", "--thresholds", '{"shrink_percent": 100}')  # merged
    outcome = env.run("many")
    assert outcome.state == "applied", outcome.report
    code, out = cli_run("report", "many")
    assert code == 0 and f"- users archive ({len(cut)}): " in out
    code, out = cli_run("report", "many", "--format", "json")
    report = json.loads(out)
    assert code == 0 and len(report["affected"]["users"]["archive"]) == 200  # the stored sample...
    assert report["affected_complete"] is False  # ...is never passed off as complete
    _, out = cli_run("report", "many", "--format", "csv")
    assert f"users archive: {len(cut) - 200} more not listed" in out
